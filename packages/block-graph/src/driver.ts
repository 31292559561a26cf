// The driver interfaces: small, after nbdkit. A driver is a definition (name, options,
// children, open) whose open() returns an instance of one of three kinds:
//
// - protocol: does pread/pwrite/flush and whatever else it can (file, null-co, nbd);
// - format: answers map(offset, length) with where the bytes live and, if writable,
//   allocates (raw, bochs, qcow2);
// - filter: passes to its one child whatever it does not override (throttle,
//   copy-on-read, blkdebug).
//
// Preconditions the generic layer (node.ts) guarantees to every instance method below, so
// that drivers do not re-check them:
// - offset and length are safe integers, length > 0, and offset + length <= size() (a
//   protocol's pwrite excepted, see there);
// - offset and length are multiples of `limits.requestAlignment` (the length may stop at
//   size() when size() itself is not aligned);
// - length <= `limits.maxTransfer` for pread/pwrite (and for filters' intercepted requests);
// - write-like calls (pwrite, writeZeroes, discard, map with intent 'write') only reach a
//   node that is not read-only and has parents holding the write permission;
// - the graph does not change while a call is in flight (every request holds the graph's
//   read lock), and close() is only called when nothing is in flight (drained);
// - buffers handed to pread/pwrite are the caller's: usually engine arena memory (the
//   generic layer's bounce buffers are), but any Uint8Array may arrive, so an O_DIRECT
//   protocol copies through an aligned buffer when the address does not suit (file does).
//
// How a format such as qcow2 fits (the `FormatInstance` below):
// - children: 'file' with roles data+metadata+primary (it owns the file's metadata: no other
//   parent may write the file), 'backing' with role cow and `nullable` (QEMU's
//   "backing": null); when the options leave 'backing' out and the header names a backing
//   file, open() calls ctx.openChild('backing', {driver, file: {driver: 'file', filename}});
// - metadata I/O goes through the child node (a ChildNode: the I/O of the generic layer,
//   nothing of the graph's bookkeeping): ctx.children.file.node.read/write/flush/truncate
//   (the file grows when written past its end: the metadata role holds 'resize'); use
//   node.allocBuffer for buffers; hold the BdrvChild, not the node (a graph change may
//   point the edge at another node);
// - map(offset, length, 'read') answers per cluster (or run of clusters): data at a host
//   offset, zero (zero cluster), or unallocated (the generic layer reads the backing
//   chain, zeros past its end); block status and allocation depth come from the same
//   answers, merged along the chain by the generic layer;
// - map(offset, length, 'write') allocates: returns the new host cluster with
//   `allocation` {start, end, from: 'below' | 'zero', commit, abort}; the generic layer
//   does the copy on write of the rest of the cluster, writes data, then commit() links
//   the L2 entry (refcounts raised before returning from map); concurrent allocations of
//   one cluster are the driver's to serialise (RangeLock);
// - writeZeroes/discard update metadata (NOT_SUPPORTED for partial clusters lets the
//   generic layer emulate); flush() writes cached metadata back before the file is
//   flushed; close() writes everything back and clears the dirty bit.
//
// Errors: reject with a BlockError (errors.ts); errors from the system keep errno,
// errnoName and syscall (toBlockError does that). pread and pwrite must do so themselves
// (the hot path does not wrap them); what other methods reject with is converted. Never
// throw synchronously from a method that returns a promise.

import type { Socket } from 'node:net';
import type { Engine } from '@vmdisk/engine';
import type { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import type { ChildRole } from './permissions.ts';
import type { RangeHold } from './range-lock.ts';
import type { InferMembers, Members } from './schema.ts';

export interface WriteFlags {
  /** The data is durable when the promise resolves. */
  fua?: boolean;
  /** The serialising operation this write belongs to (ChildNode.serialise). */
  owner?: RangeHold;
}

export interface ZeroFlags {
  fua?: boolean;
  /** The range may be deallocated (a hole) rather than written. */
  mayUnmap?: boolean;
  /** Fail with ENOTSUP rather than fall back to writing zero buffers. */
  fastZero?: boolean;
  /** The serialising operation this request belongs to (ChildNode.serialise). */
  owner?: RangeHold;
}

/** Block status of a range from its start, relative to one node. */
export interface Status {
  length: number;
  /** Not stored: reads as zeros without data. */
  hole: boolean;
  /** Reads as zeros. */
  zero: boolean;
  /** 0 unallocated in the whole chain, 1 allocated in this node's layer, n in the (n-1)th backing. */
  depth: number;
}

/**
 * What a driver may do with a child node: the generic layer's I/O (bounds checked,
 * aligned, split, emulated as for any request) and a few facts about it. Not the graph's
 * bookkeeping (refcounts, parents, permissions): those stay with the graph. BlockNode
 * (node.ts) implements it.
 */
export interface ChildNode {
  /** The node name (for messages). */
  readonly name: string;
  /** The driver's name ('file', 'qcow2'). */
  readonly driver: string;
  readonly readOnly: boolean;
  /** A format node (its data is mapped through map()). */
  readonly isFormat: boolean;
  /** Its backing (cow) child, if any. */
  readonly backing: BdrvChild | undefined;
  /** The child it filters or whose format it reads (its primary child), if any. */
  readonly primary: BdrvChild | undefined;
  /** The file name of a `file` node (to resolve a backing file name against), else undefined. */
  readonly filename: string | undefined;
  size(): number;
  /** The format's cluster size (QEMU bdrv_get_info), through filters; undefined if none. */
  clusterSize(): number | undefined;
  /** Fills buf with the bytes at offset. */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Where [offset, offset + length) is, whole, in a cached host file (NodeRead.fileRange). */
  fileRange(offset: number, length: number): FileRange | undefined;
  write(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void>;
  writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  /** Deallocates where the node's `discard` option allows it (a no-op otherwise). */
  discard(offset: number, length: number): Promise<void>;
  /** Makes completed writes durable, down to the storage. */
  flush(): Promise<void>;
  /** Sets the size of a protocol node (the parent must hold 'resize'). */
  truncate(size: number): Promise<void>;
  /** Status of the range from offset on (one extent); wantZero false: allocation suffices. */
  blockStatus(offset: number, length: number, wantZero?: boolean): Promise<Status>;
  /** A buffer for I/O (page-aligned engine memory once an engine is in use). */
  allocBuffer(length: number): Uint8Array;
  releaseBuffer(buf: Uint8Array): void;
  /** Serialises overlapping writes on the node from now on (copy-on-read's child). */
  enableTracking(): void;
  /**
   * Takes [start, end) exclusively (overlapping writes wait) for a read-then-write
   * operation such as copy-on-read: pass the hold as `owner` to its writes, release it after.
   */
  serialise(start: number, end: number): Promise<RangeHold>;
  release(hold: RangeHold): void;
  /** The node's dirty bitmap of that name (copy-before-write's `bitmap` option). */
  findDirtyBitmap(name: string): BdrvDirtyBitmap | undefined;
  /** Writes `length` bytes of `src` at `offset` without a buffer where it can (NodeCopy). */
  copyFrom?(offset: number, length: number, src: CopySource): Promise<boolean>;
}

/**
 * An edge from a node to one of its children as its driver sees it. The edge may be
 * pointed at another node by a graph change: hold the edge, read `node` when needed.
 */
export interface BdrvChild {
  /** The child's key in its parent ('file', 'backing', 'image'). */
  readonly name: string;
  readonly roles: readonly ChildRole[];
  readonly node: ChildNode;
}

/** A child key of a driver: a node name or inline blockdev-add options. */
export interface ChildSpec {
  /** The key in blockdev-add ('file', 'backing', 'image'). */
  key: string;
  required: boolean;
  /** `null` allowed (QEMU's "backing": null: no backing file). */
  nullable?: boolean;
  /** The roles the child has, given the node's validated options. */
  roles(options: Readonly<Record<string, unknown>>): ChildRole[];
}

/** I/O limits of a node; the generic layer aligns and splits requests to them. */
export interface Limits {
  /** Requests reaching the instance are aligned to this (power of two; default 1). */
  requestAlignment?: number;
  /** Requests reaching pread/pwrite are at most this long (default: unlimited). */
  maxTransfer?: number;
}

/** What open() is given; `O` is the driver's options as its schema types them. */
export interface OpenContext<O = Record<string, unknown>> {
  readonly nodeName: string;
  readonly readOnly: boolean;
  /**
   * auto-read-only: when opening for writing fails for lack of permission (EACCES, EPERM,
   * EROFS), open read-only instead and call setReadOnly().
   */
  readonly autoReadOnly: boolean;
  /** Makes the node read-only (auto-read-only fallback); permissions are checked again. */
  setReadOnly(): void;
  /** cache.direct: O_DIRECT on files. */
  readonly direct: boolean;
  /** The driver's own keys, checked against its `options` (absent keys are absent). */
  readonly options: Readonly<O>;
  /** The children attached by key ('file', 'backing'), before open() is called. */
  readonly children: Readonly<Record<string, BdrvChild | undefined>>;
  /**
   * The child keys the options set to null (QEMU's "backing": null): absent from
   * `children`, and not to be opened from the image's own metadata either.
   */
  readonly nullChildren: ReadonlySet<string>;
  /**
   * The I/O engine (@vmdisk/engine) for `backend`, shared by the graph; the graph's buffer
   * allocation (allocBuffer) uses the first engine opened.
   */
  engine(backend: 'io_uring' | 'aio' | 'threadpool' | 'auto'): Promise<EngineLike>;
  /** For each socket the driver connects, before use (BlockGraphOptions.configureSocket). */
  readonly configureSocket: ((socket: Socket) => void) | undefined;
  /** Files' seeks on the calling thread where they are quick (BlockGraphOptions.inlineSeeks). */
  readonly inlineSeeks: boolean;
  /**
   * Opens and attaches a child the user's options left out (absent, not null), from
   * blockdev-add options: e.g. qcow2 opening the backing file its header names, as
   * {driver: 'qcow2', file: {driver: 'file', filename}}. The key must be one of the
   * driver's `children`; the child is owned by this node (it goes when the node goes) and
   * inherits settings as an inline child does (a backing file is read-only by default).
   * Resolves to the attached edge, also visible in `children` afterwards.
   */
  openChild(key: string, options: unknown): Promise<BdrvChild>;
  /**
   * An object of the graph (BlockGraph.addObject) by type and id, e.g. a throttle-group;
   * the node uses it until it closes (the object cannot be deleted meanwhile). A missing
   * one is a BlockOptionError on `key`. The value is the registry's (ObjectValues in
   * objects.ts, which imports the drivers): check it with instanceof, not a cast.
   * `keep` false: read once, not taken into use (QEMU reads a secret at open; it may be
   * deleted afterwards).
   */
  object(type: string, id: string, key: string, keep?: boolean): unknown;
}

/** The I/O engine (@vmdisk/engine). */
export type EngineLike = Engine;

interface InstanceBase {
  /** The size in bytes (the virtual disk size for formats), as of now. */
  size(): number;
  readonly limits?: Limits;
  /** Called when a drained section begins on the graph: let queued requests go. */
  drainBegin?(): void;
  /** Releases what open() took (formats: write metadata back, mark clean). */
  close?(): Promise<void>;
  /** Extra fields for query-named-block-nodes (e.g. { file: '/x.img' }). */
  info?(): Record<string, unknown>;
  /** Persistent dirty bitmaps (a format that stores them); without it a node has none. */
  readonly persistentBitmaps?: PersistentBitmapStore;
  /**
   * Permission changes, for a driver that holds something outside the process for its
   * users' permissions (the file driver's image locks): QEMU's bdrv_check_perm, set_perm and
   * abort_perm_update. Called synchronously under the graph's write lock, from the first
   * change after open() on, with the cumulative permissions the node's parents take (perm)
   * and share (shared), as permissions.ts bits. checkPerm may refuse by throwing a
   * BlockError (it undoes its own partial work first; nothing changes); after a check that
   * passed comes exactly one of setPerm (the change is made) or abortPerm (it is not:
   * another node refused).
   */
  checkPerm?(perm: number, shared: number): void;
  setPerm?(perm: number, shared: number): void;
  abortPerm?(): void;
}

/**
 * The dirty bitmaps a format stores in its image (qcow2's bitmaps extension), as the node
 * layer (node-dirty.ts) uses them: load after open, ask before making one persistent,
 * remove one from the image, store them all before close.
 */
export interface PersistentBitmapStore {
  /** The image's bitmaps (those found in use flagged inconsistent); marks them in use. */
  load(): Promise<BdrvDirtyBitmap[]>;
  /** Throws a BlockError with the reason (QEMU's words) a new bitmap could not be stored. */
  canStore(name: string, granularity: number): void;
  /** Drops the bitmap of that name from the image (nothing when it is not stored yet). */
  remove(name: string): Promise<void>;
  /** Writes the node's persistent bitmaps to the image, not in use (before close). */
  store(bitmaps: readonly BdrvDirtyBitmap[]): Promise<void>;
}

/** Block status of a range at a protocol node. */
export interface ProtocolStatus {
  /** Bytes from offset this answer covers (> 0, at most the length asked). */
  length: number;
  /** Not stored (a hole): reads as zeros. */
  hole: boolean;
  /** Reads as zeros. */
  zero: boolean;
}

/**
 * A protocol: the smallest instance is size() and pread() (`kind` may be left out); the
 * generic layer does the rest (block status says all data, requests are aligned and split
 * to `limits`, writes are refused without pwrite).
 */
export interface ProtocolInstance extends InstanceBase {
  readonly kind?: 'protocol';
  /** Fills buf with the bytes at offset. */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * Writes buf at offset. Absent: read-only protocol. A write may end past size() (only
   * when a parent holds 'resize', e.g. a format allocating at the end of its file): the
   * size then grows to its end.
   */
  pwrite?(buf: Uint8Array, offset: number): Promise<void>;
  /** Sets the size (a parent holds 'resize'). */
  truncate?(size: number): Promise<void>;
  /** Makes completed writes durable. Absent: nothing to do. */
  flush?(): Promise<void>;
  /** Deallocates a range (reads then return anything; the file driver punches holes). */
  discard?(offset: number, length: number): Promise<void>;
  /**
   * Writes zeros efficiently (mayUnmap: a hole is fine). Reject with NOT_SUPPORTED when the
   * storage cannot: the generic layer then writes zero buffers (unless fastZero was asked).
   */
  writeZeroes?(offset: number, length: number, mayUnmap: boolean): Promise<void>;
  /** Status of the range from offset. Absent: all data. */
  blockStatus?(offset: number, length: number): Promise<ProtocolStatus>;
  /**
   * Writes `length` bytes of `src` (another protocol's instance) at `srcOffset` here at
   * `offset` without a buffer, where the two can (the file driver: copy_file_range between
   * files of one file system). Resolves false where they cannot, the range then holding
   * nothing a write of it would not replace: the caller reads and writes instead. May end
   * past size() as pwrite.
   */
  copyFrom?(
    src: ProtocolInstance,
    srcOffset: number,
    offset: number,
    length: number,
  ): Promise<boolean>;
  /**
   * Where [offset, offset + length) is in an open file now, when reading it from there
   * gives what pread would and does not wait for a disk (its pages are cached): for a
   * server to send the bytes straight from the file (BlockNode.fileRange). Synchronous.
   * Absent, or undefined: pread is the way.
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
}

/** Bytes of an open file: its descriptor and where in it (ProtocolInstance.fileRange). */
export interface FileRange {
  fd: number;
  offset: number;
}

/** Where the bytes of a copy come from: a protocol and an offset in it (NodeCopy.dataIn). */
export interface CopySource {
  protocol: ProtocolInstance;
  offset: number;
  /** Bytes from `offset` that are the data asked for, contiguously. */
  length: number;
}

/**
 * Where a range of a format node's guest bytes lives: the answer of map().
 * - `data`: in `child` at `offset` (the range is contiguous there), or, for bytes that are
 *   no place in a child (qcow2's compressed clusters), produced by the mapping's `read`;
 * - `zero`: reads as zeros, stored as such in the format's metadata;
 * - `unallocated`: not in this layer: read from the backing (cow) child, zeros past its
 *   end or without one.
 */
export interface Mapping {
  /** Bytes from the asked offset this answer covers: 0 < length <= the length asked. */
  length: number;
  kind: 'data' | 'zero' | 'unallocated';
  /** For data: the child holding the bytes. */
  child?: BdrvChild;
  /**
   * For data: the offset in that child. For zero or unallocated: where storage is allocated
   * for the range all the same (QEMU's OFFSET_VALID without DATA), for qemu-img map.
   */
  offset?: number;
  /** For data: block status is the child's as is (raw); otherwise data, plus zero if the child says so. */
  passthrough?: boolean;
  /**
   * For data of intent 'read' that lives in no child (instead of child and offset): fills
   * buf with the guest bytes at offset (within the mapped range). The generic layer
   * reports such data as allocated here and not zero, writes zero buffers over it when
   * zeroing falls back to emulation, and leaves it alone when discard falls back.
   */
  read?(offset: number, buf: Uint8Array): Promise<void>;
  /**
   * For intent 'write' only, when map() allocated new storage for the range: the guest
   * range [start, end) of the new allocation unit(s), which contains [offset, offset +
   * length) and is backed by child bytes at `offset - (askedOffset - start)` onwards.
   * The generic layer fills the bytes of the unit outside the write (copy on write) with
   * what they read as before (`from`: 'below' = the backing chain, zeros past its end or
   * without one; 'zero' = zeros), writes the whole unit to the child, then calls commit()
   * to link it in the metadata (data before the L2 entry); abort() when the data write
   * failed.
   */
  allocation?: {
    start: number;
    end: number;
    from: 'below' | 'zero';
    commit(): Promise<void>;
    abort?(error: unknown): Promise<void>;
  };
}

export type MapIntent = 'read' | 'write';

export interface FormatInstance extends InstanceBase {
  readonly kind: 'format';
  /**
   * Where [offset, offset + length) lives, from offset on (one answer; the generic layer
   * asks again for the rest). With intent 'write' the answer is always `data` (allocating
   * if needed, see Mapping.allocation). May answer synchronously (raw does, for speed).
   * Concurrency: map() may be called by concurrent requests; a driver that allocates must
   * make sure two concurrent writes to one unallocated unit do not both allocate it (keep
   * in-flight allocations until commit/abort and make the second one wait: RangeLock in
   * range-lock.ts does that).
   */
  map(offset: number, length: number, intent: MapIntent): Mapping | Promise<Mapping>;
  /**
   * Marks a range as zeros in the metadata (e.g. qcow2 zero clusters; mayUnmap: storage
   * may be freed). Absent, or rejecting with NOT_SUPPORTED (e.g. a range that is not whole
   * clusters): the generic layer zeroes data mappings in the child and writes zero buffers
   * where the range would otherwise read from the backing chain.
   */
  writeZeroes?(offset: number, length: number, mayUnmap: boolean): Promise<void>;
  /** Deallocates a range in the metadata. Absent: data mappings are discarded in the child. */
  discard?(offset: number, length: number): Promise<void>;
  /** Writes cached metadata back (called before the children are flushed). */
  flush?(): Promise<void>;
  /** Sets the virtual size (block_resize), drained. Absent: the size cannot change. */
  truncate?(size: number): Promise<void>;
  /**
   * Writes one whole cluster compressed (qemu-img convert -c), `offset` cluster aligned;
   * the last cluster of the disk may be shorter. Absent: the format cannot compress.
   */
  writeCompressed?(offset: number, buf: Uint8Array): Promise<void>;
  /** The unit writeCompressed takes (the cluster size). */
  readonly compressedUnit?: number;
  /**
   * Writes another backing file name and format into the image (null: none), drained
   * (QEMU bdrv_change_backing_file: stream and commit at their end).
   */
  changeBackingFile?(filename: string | null, format: string | null): Promise<void>;
  /** Deallocates everything (QEMU bdrv_make_empty: qemu-img commit, rebase). */
  makeEmpty?(): Promise<void>;
  /**
   * The node's backing (cow) child changed: another node, or none (QEMU's
   * bdrv_backing_attach/detach). Called by the graph, drained, for a driver that reads its
   * backing file itself (qcow2: copy on write, zero clusters).
   */
  backingChanged?(child: BdrvChild | undefined): void;
}

/** One request as a filter sees it before passing it on. */
export interface FilterRequest {
  op: 'read' | 'write' | 'write-zeroes' | 'discard' | 'flush' | 'block-status';
  offset: number;
  length: number;
}

export interface FilterInstance extends InstanceBase {
  readonly kind: 'filter';
  /** The filtered child every request goes to. */
  readonly child: BdrvChild;
  /** Runs before a request is passed on: wait (throttle) or reject (blkdebug). */
  intercept?(req: FilterRequest): Promise<void> | undefined;
  /** Replaces the pass-through read (copy-on-read). */
  read?(offset: number, buf: Uint8Array): Promise<void>;
  /** Replace the pass-through writes (mirror_top: a write goes to the child and a target). */
  write?(offset: number, buf: Uint8Array): Promise<void>;
  writeZeroes?(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
}

export type DriverInstance = ProtocolInstance | FormatInstance | FilterInstance;

/**
 * A driver: what blockdev-add's `driver` names. `M` is its options' schema (schema.ts):
 * open() and validate() get them typed (InferMembers<M>); write drivers with
 * defineDriver() so that `M` is inferred.
 */
export interface BlockDriver<M extends Members = Members> {
  readonly name: string;
  /**
   * The driver's own option keys as schema members (common keys such as node-name are the
   * graph's; default none). Typed in JSON (QMP); the command line's keyval strings ('4096',
   * 'on') are converted by the schema.
   */
  readonly options?: M;
  readonly children?: readonly ChildSpec[];
  /**
   * blockdev-reopen: the driver's option keys that may change, and whether the instance
   * depends on read-only or cache.direct (the file's open mode, qcow2's metadata): then
   * the instance is opened again (closed first when it goes read-only). Default: no
   * driver option may change; read-only and the other settings change the node alone.
   */
  readonly reopen?: { readonly options?: readonly string[]; readonly instance?: boolean };
  /** The node can only be read-only ('read-only' defaults to true, false is refused). */
  readonly readOnlyOnly?: boolean;
  /**
   * The permissions the node takes on a child, given what its parents take and share
   * (perm, shared) and whether it may write. Absent: defaultChildPerms (permissions.ts).
   */
  childPerms?(
    roles: readonly ChildRole[],
    perm: number,
    shared: number,
    writable: boolean,
  ): { perm: number; shared: number };
  /** Checks relations between options after each was checked alone (throw BlockOptionError). */
  validate?(options: Readonly<InferMembers<M>>): void;
  open(ctx: OpenContext<InferMembers<M>>): Promise<DriverInstance>;
}

/** A driver whose options' types are inferred from its `options` schema. */
export function defineDriver<const M extends Members = Record<never, never>>(
  driver: BlockDriver<M>,
): BlockDriver<M> {
  return driver;
}
