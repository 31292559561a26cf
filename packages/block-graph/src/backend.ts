// BlockBackend: what a user of a node holds (an export, a job, the app). It takes the
// permissions it needs when attached, holds the graph's read lock for each request, and
// has the shape of @vmdisk/nbd's ExportTarget (without importing it).

import type { FileRange } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import type { GraphLock } from './graph-lock.ts';
import type { BlockNode, ChildEdge, ChildParent, SparsePiece } from './node.ts';
import {
  BLK_PERM_CONSISTENT_READ,
  BLK_PERM_RESIZE,
  BLK_PERM_WRITE,
  BLK_PERM_WRITE_UNCHANGED,
  type PermissionName,
  permBits,
} from './permissions.ts';

/** What a backend needs from its graph (BlockGraph implements it). */
export interface BackendHost {
  /** Requests hold its read side. */
  readonly lock: GraphLock;
  allocBuffer(length: number): Buffer;
  releaseBuffer(buf: Uint8Array): void;
  /** Detaches the backend's edge and gives its reference back (under the write lock). */
  detachBackend(backend: BlockBackend, edge: ChildEdge): Promise<void>;
}

export interface BackendOptions {
  /** The backend's name in queries and permission errors (default backendN). */
  name?: string;
  /** It writes: takes the 'write' permission (default false). */
  write?: boolean;
  /** Others may write the node too (QEMU's share-rw; default false). */
  shareWrite?: boolean;
  /** Exact permissions to take, instead of what write implies. */
  perm?: readonly PermissionName[];
  /** Exact permissions to share, instead of what shareWrite implies. */
  shared?: readonly PermissionName[];
  /** Most extents one blockStatus answer carries (default 1024). */
  maxExtents?: number;
  /**
   * A block job's hold on a node (QEMU's child_job), named "<type> job '<id>'": the node
   * is busy for blockdev-del rather than in use, as in QEMU.
   */
  jobChild?: boolean;
}

export interface BackendWriteFlags {
  fua?: boolean;
}

export interface BackendZeroFlags extends BackendWriteFlags {
  /** Keep the range allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than write zero buffers (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero?: boolean;
}

/** One extent of block status (the ExportTarget Extent). */
export interface Extent {
  length: number;
  /** Not stored: reads as zeros without data (NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads as zeros (NBD_STATE_ZERO). */
  zero: boolean;
  /** 0 unallocated in the whole chain, 1 in the top layer, N in the (N-1)th backing layer. */
  depth?: number;
}

const CACHE_CHUNK = 1 << 20;
const FUA = Object.freeze({ fua: true });
const NO_FLAGS = Object.freeze({});

export class BlockBackend implements ChildParent {
  readonly isBackend = true;
  /**
   * FUA is honoured here: the node's generic I/O layer (node.ts) emulates it with a flush
   * of the node, so the NBD server passes it down rather than emulating it again.
   */
  readonly nativeFua = true;
  /** One graph in one process: a flush through any backend flushes the same nodes. */
  readonly multiConnSafe = true;
  readonly reportsDepth = true;
  private root: ChildEdge | undefined;
  private closing: Promise<void> | undefined;
  private readonly maxExtents: number;

  private readonly graph: BackendHost;
  readonly name: string;
  private readonly options: BackendOptions;

  constructor(graph: BackendHost, name: string, options: BackendOptions) {
    this.graph = graph;
    this.name = name;
    this.options = options;
    this.maxExtents = options.maxExtents ?? 1024;
  }

  get jobChild(): boolean {
    return this.options.jobChild ?? false;
  }

  /** @internal: the permissions this backend takes and shares. */
  wantedPerms(): { perm: number; shared: number } {
    const o = this.options;
    const perm = o.perm
      ? permBits(o.perm)
      : BLK_PERM_CONSISTENT_READ | (o.write ? BLK_PERM_WRITE : 0);
    const shared = o.shared
      ? permBits(o.shared)
      : BLK_PERM_CONSISTENT_READ |
        BLK_PERM_WRITE_UNCHANGED |
        (o.shareWrite ? BLK_PERM_WRITE | BLK_PERM_RESIZE : 0);
    return { perm, shared };
  }

  /** @internal: set by the graph under its write lock. */
  attach(edge: ChildEdge | undefined): void {
    this.root = edge;
  }

  /** @internal: the edge to the root node. */
  get edge(): ChildEdge | undefined {
    return this.root;
  }

  /** The node this backend is attached to now (it changes when a filter is inserted). */
  get nodeName(): string {
    return this.node().name;
  }

  /** Whether this backend took the write permission. */
  get writable(): boolean {
    return !!this.root && (this.root.perm & BLK_PERM_WRITE) !== 0;
  }

  /** The I/O constraints of the root node. */
  get blockSize(): { minimum: number; preferred: number; maximum: number } {
    // The alignment that avoids read-modify-write anywhere down the primary chain.
    let align = 1;
    for (let n: BlockNode | undefined = this.root?.node; n; n = n.primary?.node) {
      align = Math.max(align, n.align);
    }
    return { minimum: align, preferred: Math.max(4096, align), maximum: 32 << 20 };
  }

  private node(): BlockNode {
    const r = this.root;
    if (!r) throw this.closedError();
    return r.node;
  }

  size(): number {
    return this.root ? this.root.node.size() : 0;
  }

  /** Fills buf with the bytes at offset. */
  read(offset: number, buf: Uint8Array): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) return this.readWaiting(offset, buf);
    const r = this.root;
    if (!r) {
      lock.releaseRead();
      return Promise.reject(this.closedError());
    }
    // The hot path: one promise of our own, the read lock released when the node is done.
    return r.node.read(offset, buf).then(this.release, this.releaseAndThrow);
  }

  /**
   * Where [offset, offset + length) is, whole, in a cached host file now
   * (BlockNode.fileRange): an NBD server sends such bytes straight from the file.
   * Undefined while the graph is being changed, and wherever a read must do it.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    const lock = this.graph.lock;
    if (!lock.tryRead()) return undefined;
    try {
      return this.root?.node.fileRange(offset, length);
    } finally {
      lock.releaseRead();
    }
  }

  private readonly release = (): void => {
    this.graph.lock.releaseRead();
  };

  private readonly releaseAndThrow = (err: unknown): never => {
    this.graph.lock.releaseRead();
    throw err;
  };

  private async readWaiting(offset: number, buf: Uint8Array): Promise<void> {
    const lock = this.graph.lock;
    await lock.read();
    try {
      await this.node().read(offset, buf);
    } finally {
      lock.releaseRead();
    }
  }

  private closedError(): BlockError {
    return new BlockError(BlockErrorCode.CLOSED, `backend '${this.name}' is closed`);
  }

  /** Writes buf at offset (fua: durable when resolved). */
  write(offset: number, buf: Uint8Array, flags: BackendWriteFlags = {}): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) return this.writeWaiting(offset, buf, flags);
    let node: BlockNode;
    try {
      node = this.writableNode();
    } catch (err) {
      lock.releaseRead();
      return Promise.reject(err);
    }
    return node
      .write(offset, buf, flags.fua ? FUA : NO_FLAGS)
      .then(this.release, this.releaseAndThrow);
  }

  private async writeWaiting(
    offset: number,
    buf: Uint8Array,
    flags: BackendWriteFlags,
  ): Promise<void> {
    const lock = this.graph.lock;
    await lock.read();
    try {
      await this.writableNode().write(offset, buf, flags.fua ? FUA : NO_FLAGS);
    } finally {
      lock.releaseRead();
    }
  }

  /**
   * The cluster size of compressed writes (writeCompressed), or undefined when the node is
   * not a format that compresses (qemu-img: "Compression not supported for this file format").
   */
  get compressedUnit(): number | undefined {
    const i = this.root?.node.instance;
    return i?.kind === 'format' && i.writeCompressed ? i.compressedUnit : undefined;
  }

  /**
   * Writes one cluster compressed (qemu-img convert -c): `offset` aligned to
   * compressedUnit, `buf` one unit (the disk's last may be shorter); through the generic
   * layer as any write.
   */
  async writeCompressed(offset: number, buf: Uint8Array): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      await this.writableNode().writeCompressed(offset, buf);
    } finally {
      lock.releaseRead();
    }
  }

  async flush(): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      await this.node().flush();
    } finally {
      lock.releaseRead();
    }
  }

  /** Discards a range (a no-op unless the node's discard option is 'unmap'). */
  async trim(offset: number, length: number, flags: BackendWriteFlags = {}): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      const node = this.writableNode();
      await node.discard(offset, length);
      if (flags.fua) await node.flush();
    } finally {
      lock.releaseRead();
    }
  }

  /** Writes zeros (a hole where allowed unless noHole). */
  async writeZeroes(offset: number, length: number, flags: BackendZeroFlags = {}): Promise<void> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      await this.writableNode().writeZeroes(offset, length, {
        fua: !!flags.fua,
        mayUnmap: !flags.noHole,
        fastZero: !!flags.fastZero,
      });
    } finally {
      lock.releaseRead();
    }
  }

  /**
   * Block status from offset: extents in order, merged, covering at least one byte. With
   * `wantZero: false` only allocation is wanted: protocol nodes report data without
   * looking for holes (QEMU's want_zero).
   */
  async blockStatus(
    offset: number,
    length: number,
    options: { wantZero?: boolean } = {},
  ): Promise<Extent[]> {
    const wantZero = options.wantZero ?? true;
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      const node = this.node();
      const out: Extent[] = [];
      let pos = 0;
      while (pos < length && out.length < this.maxExtents) {
        const s = await node.blockStatus(offset + pos, length - pos, wantZero);
        const last = out[out.length - 1];
        if (last && last.hole === s.hole && last.zero === s.zero && last.depth === s.depth) {
          last.length += s.length;
        } else {
          out.push({ length: s.length, hole: s.hole, zero: s.zero, depth: s.depth });
        }
        pos += s.length;
      }
      return out;
    } finally {
      lock.releaseRead();
    }
  }

  /**
   * A READ's data and holes together (ExportTarget.readSparse): one pass over the node's
   * mapping under one hold of the read lock; the holes take no memory.
   */
  async readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    const lock = this.graph.lock;
    if (!lock.tryRead()) await lock.read();
    try {
      return await this.node().readSparse(offset, length, alloc);
    } finally {
      lock.releaseRead();
    }
  }

  /** Reads a range through (copy-on-read filters copy it) and drops the data. */
  async cache(offset: number, length: number): Promise<void> {
    const buf = this.allocBuffer(Math.min(CACHE_CHUNK, Math.max(length, 1)));
    try {
      for (let pos = 0; pos < length; pos += CACHE_CHUNK) {
        const n = Math.min(CACHE_CHUNK, length - pos);
        await this.read(offset + pos, buf.subarray(0, n));
      }
    } finally {
      this.releaseBuffer(buf);
    }
  }

  /** A buffer for a request: engine arena memory (page-aligned) when an engine is in use. */
  allocBuffer(length: number): Buffer {
    return this.graph.allocBuffer(length);
  }

  releaseBuffer(buf: Uint8Array): void {
    this.graph.releaseBuffer(buf);
  }

  /** Detaches from the node (drained), giving its permissions and reference back. */
  close(): Promise<void> {
    if (!this.closing) {
      const edge = this.root;
      this.closing = edge ? this.graph.detachBackend(this, edge) : Promise.resolve();
    }
    return this.closing;
  }

  private writableNode(): BlockNode {
    const node = this.node();
    if (!(this.root!.perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED))) {
      throw new BlockError(
        BlockErrorCode.READ_ONLY,
        `backend '${this.name}' did not take the write permission`,
      );
    }
    return node;
  }
}
