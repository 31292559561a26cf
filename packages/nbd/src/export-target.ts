// What an NBD export serves. Any object of this shape will do: a block-graph BlockBackend
// has it, and so can a plain file or memory target; @vmdisk/nbd never imports the block
// layer.
//
// Preconditions the server guarantees (a target does not re-check them): every request
// is in bounds (offset + length <= size(), checked without overflow), lengths are > 0
// and at most the advertised maximum block size, and write/trim/writeZeroes are only
// called on a writable export. Requests may run concurrently. A buffer given to read or
// write is the target's only until the promise settles: the server then reuses or frees
// it (a target that keeps data copies it).
//
// Errors: a target rejects with an Error whose `errnoName` (or, for Node system errors,
// `code`) is an errno name such as 'EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP'; the
// server answers with the matching NBD error and EIO for anything else.

export interface WriteFlags {
  /** Force Unit Access: the data is durable when the promise resolves. */
  fua?: boolean;
}

export interface WriteZeroesFlags extends WriteFlags {
  /** The client asked that the range stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than fall back to a slow write (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero?: boolean;
}

/** One extent of block status, in order, covering the range asked for from its start. */
export interface Extent {
  length: number;
  /** Reads as zeros without being stored (base:allocation NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads as zeros (base:allocation NBD_STATE_ZERO). */
  zero: boolean;
  /**
   * qemu:allocation-depth: 0 unallocated in the whole chain, 1 allocated in the top
   * layer, N in the (N-1)th backing layer. Only when the target reports depth.
   */
  depth?: number;
}

export interface BlockStatusOptions {
  /**
   * QEMU's want_zero. true (the default): the caller wants to know exactly which ranges
   * read as zeros (NBD_CMD_BLOCK_STATUS). false: only what is cheap to know is wanted (a
   * sparse READ looking for holes to skip): a target may report plain data where finding
   * out would cost a system call, e.g. a file's holes behind SEEK_DATA.
   */
  wantZero?: boolean;
}

/**
 * A piece of a sparse read, in order: `data` read from the target, or without data a hole
 * (it reads as zeros and is sent as NBD_REPLY_TYPE_OFFSET_HOLE).
 */
export interface SparsePiece {
  offset: number;
  length: number;
  data?: Uint8Array | undefined;
}

/** One extent of a dirty bitmap's status, in order from the offset asked for. */
export interface BitmapExtent {
  length: number;
  /** Written since the bitmap was cleared (qemu:dirty-bitmap flag 1, NBD_STATE_DIRTY). */
  dirty: boolean;
}

/**
 * A dirty bitmap an export offers as meta context `qemu:dirty-bitmap:NAME` (as QEMU's
 * block-export-add `bitmaps`). The list is fixed when the export is added.
 */
export interface ExportBitmap {
  /** The NAME of the context (a bitmap name: not empty, at most 1023 bytes). */
  readonly name: string;
  /**
   * The bitmap's status of [offset, offset + length): extents in order from `offset`,
   * covering at least one byte (more than the range is cut off).
   */
  status(offset: number, length: number): BitmapExtent[] | Promise<BitmapExtent[]>;
}

/** Bytes of an open file: its descriptor and where in it (ExportTarget.fileRange). */
export interface FileRange {
  fd: number;
  offset: number;
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ExportTarget {
  /** The size in bytes, as of now. */
  size(): number;
  /** Fills `buf` with the bytes at `offset` (the whole of it). */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Writes `buf` at `offset`. Absent: the target is read-only. */
  write?(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void>;
  /** Makes completed writes durable. */
  flush?(): Promise<void>;
  /** Discards a range (it may then read as anything, or as zeros where it says so). */
  trim?(offset: number, length: number, flags: WriteFlags): Promise<void>;
  /** Writes zeros, by deallocating where allowed and cheap. */
  writeZeroes?(offset: number, length: number, flags: WriteZeroesFlags): Promise<void>;
  /** The allocation status of a range: extents from `offset`, covering at least one byte. */
  blockStatus?(offset: number, length: number, options?: BlockStatusOptions): Promise<Extent[]>;
  /**
   * Reads a range as data and holes together, in one pass (e.g. one mapping under one
   * lock): pieces in order covering exactly [offset, offset + length). Only holes that are
   * cheap to know need be reported (as blockStatus with wantZero false). Data buffers come
   * from `alloc` (the request's memory; a hole takes none) and go back to the server,
   * whatever the outcome, once the promise has settled: it settles only when no read into
   * them is still running. Absent: the server asks blockStatus, then reads the data.
   */
  readSparse?(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]>;
  /**
   * Where [offset, offset + length) is, whole, in an open file now, when reading it from
   * there gives what read() would and does not wait for a disk (its pages are cached):
   * the server may then send it to the client straight from the file (sendfile), before
   * it returns to the event loop. Undefined where read() must do it (e.g. metadata to
   * load, zeros, a filter, direct I/O). Synchronous; preconditions as read(). A target
   * that keeps statistics counts the read here.
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
  /** Prefetches a range into whatever cache the target has. */
  cache?(offset: number, length: number): Promise<void>;
  /**
   * A buffer for a request of `length` bytes (e.g. page-aligned memory from an arena, so
   * that O_DIRECT needs no bounce); the server hands it back with releaseBuffer once the
   * request is done and its reply sent. Absent: the server allocates ordinary buffers.
   */
  allocBuffer?(length: number): Uint8Array;
  releaseBuffer?(buf: Uint8Array): void;
  /** FUA is honoured natively (otherwise the server emulates it with a flush). */
  readonly nativeFua?: boolean;
  /** A flush on any connection makes writes from all connections durable and visible. */
  readonly multiConnSafe?: boolean;
  /** blockStatus fills Extent.depth (qemu:allocation-depth may be offered). */
  readonly reportsDepth?: boolean;
  /** Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts, in order. */
  readonly dirtyBitmaps?: readonly ExportBitmap[];
  /** The target's I/O constraints; the server advertises them with NBD_INFO_BLOCK_SIZE. */
  readonly blockSize?: BlockSizeConstraints;
}
