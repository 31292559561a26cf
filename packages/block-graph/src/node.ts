// BlockNode (QEMU's BlockDriverState) with its edges (ChildEdge: the BdrvChild drivers
// see), and the generic I/O layer: bounds checks, alignment with read-modify-write,
// splitting at max transfer, zero-write and FUA emulation, backing-chain fall-through and
// block status along the chain. BlockNode is the ChildNode of driver.ts.
//
// Requests reach a node through read/write/writeZeroes/discard/flush/blockStatus, always
// under the graph's read lock (taken by the BlockBackend). What the driver instances are
// guaranteed is documented in driver.ts.

import type {
  BdrvChild,
  ChildNode,
  DriverInstance,
  FilterInstance,
  FormatInstance,
  Mapping,
  ProtocolInstance,
  Status,
  WriteFlags,
  ZeroFlags,
} from './driver.ts';
import { BlockError, BlockErrorCode, toBlockError } from './errors.ts';
import type { ChildRole } from './permissions.ts';
import { BLK_PERM_ALL, BLK_PERM_RESIZE } from './permissions.ts';
import { type RangeHold, RangeLock } from './range-lock.ts';

/** A piece of a sparse read: data read, or (without data) a hole reading as zeros. */
export interface SparsePiece {
  offset: number;
  length: number;
  data?: Uint8Array;
}

/** Who holds an edge: a node or a backend (by name). */
export interface ChildParent {
  readonly name: string;
  readonly isBackend: boolean;
}

/** An edge from a parent to a child node, with the permissions taken and shared. */
export class ChildEdge implements BdrvChild {
  /** Permissions this parent takes on the node (BLK_PERM_* bits). */
  perm = 0;
  /** Permissions this parent lets others take. */
  shared = BLK_PERM_ALL;

  /** The child's name in its parent ('file', 'backing', 'root'). */
  readonly name: string;
  readonly roles: readonly ChildRole[];
  readonly parent: ChildParent;
  node: BlockNode;

  constructor(name: string, roles: readonly ChildRole[], parent: ChildParent, node: BlockNode) {
    this.name = name;
    this.roles = roles;
    this.parent = parent;
    this.node = node;
  }
}

export interface NodeSettings {
  readOnly: boolean;
  direct: boolean;
  noFlush: boolean;
  discard: 'ignore' | 'unmap';
  detectZeroes: 'off' | 'on' | 'unmap';
  /** Fall back to read-only when the storage cannot be opened for writing. */
  autoReadOnly: boolean;
  /**
   * force-share: parents share every permission on this node whatever they would share
   * (read-only nodes only): how qemu-img -U reads an image another process writes.
   */
  forceShare: boolean;
}

const ZERO_CHUNK = 1 << 20;
let zeroBuffer: Uint8Array | undefined;

function zeros(length: number): Uint8Array {
  zeroBuffer ??= new Uint8Array(ZERO_CHUNK);
  return zeroBuffer.subarray(0, length);
}

function isZero(buf: Uint8Array): boolean {
  // 8 bytes at a time when the view allows it.
  const n = buf.byteLength;
  let i = 0;
  if ((buf.byteOffset & 7) === 0) {
    const words = new BigUint64Array(buf.buffer, buf.byteOffset, n >>> 3);
    for (const w of words) if (w !== 0n) return false;
    i = words.length * 8;
  }
  for (; i < n; i++) if (buf[i] !== 0) return false;
  return true;
}

function outOfBounds(node: string, offset: number, length: number, size: number): BlockError {
  return new BlockError(
    BlockErrorCode.OUT_OF_BOUNDS,
    `request [${offset}, +${length}) is outside node '${node}' of ${size} bytes`,
  );
}

/**
 * Checks [offset, offset + length) against size without overflow: both must be safe
 * non-negative integers and length <= size - offset. Returns the error or undefined.
 */
export function checkRequest(
  node: string,
  offset: number,
  length: number,
  size: number,
): BlockError | undefined {
  if (
    !Number.isSafeInteger(offset) ||
    !Number.isSafeInteger(length) ||
    offset < 0 ||
    length < 0 ||
    offset > size ||
    length > size - offset
  ) {
    return outOfBounds(node, offset, length, size);
  }
  return undefined;
}

/** The services a node needs from its graph. */
export interface NodeHost {
  allocBuffer(length: number): Uint8Array;
  releaseBuffer(buf: Uint8Array): void;
}

export class BlockNode implements ChildParent, ChildNode {
  readonly isBackend = false;
  /** Edges to children, by child name. */
  readonly children = new Map<string, ChildEdge>();
  /** Edges from parents (nodes and backends). */
  readonly parents = new Set<ChildEdge>();
  /** References: one per parent edge, one for the graph's user if it added the node by name. */
  refcount = 0;
  /** Added by the graph's user (blockdev-add) rather than inline: may be removed by name. */
  ownedByUser = false;
  /** Cumulative permissions of the parents (computed by the graph). */
  perm = 0;
  shared = BLK_PERM_ALL;
  instance!: DriverInstance;
  align = 1;
  maxTransfer = Number.MAX_SAFE_INTEGER;
  private tracker: RangeLock | undefined;
  closed = false;
  /** Ids of the graph objects this node uses (released when it closes). */
  readonly objects: string[] = [];

  readonly name: string;
  readonly driver: string;
  readonly settings: NodeSettings;
  /** The options it was added with (for queries). */
  readonly options: Readonly<Record<string, unknown>>;
  private readonly host: NodeHost;

  constructor(
    name: string,
    driver: string,
    settings: NodeSettings,
    options: Readonly<Record<string, unknown>>,
    host: NodeHost,
  ) {
    this.name = name;
    this.driver = driver;
    this.settings = settings;
    this.options = options;
    this.host = host;
  }

  get readOnly(): boolean {
    return this.settings.readOnly;
  }

  get filename(): string | undefined {
    const f = this.driver === 'file' ? this.options.filename : undefined;
    return typeof f === 'string' ? f : undefined;
  }

  /** Called by the graph once the driver is open. */
  setInstance(instance: DriverInstance): void {
    this.instance = instance;
    const align = instance.limits?.requestAlignment ?? 1;
    if (!Number.isSafeInteger(align) || align < 1 || (align & (align - 1)) !== 0) {
      throw new BlockError(
        BlockErrorCode.BAD_OPTION,
        `node '${this.name}': bad request alignment ${align}`,
      );
    }
    this.align = align;
    const max = instance.limits?.maxTransfer;
    if (max !== undefined) this.maxTransfer = Math.max(align, max - (max % align));
    if (align > 1) this.tracker = new RangeLock();
  }

  /** Serialise overlapping writes on this node (copy-on-read needs it on its child). */
  enableTracking(): void {
    this.tracker ??= new RangeLock();
  }

  /**
   * Takes [start, end) of this node exclusively (waits for overlapping writes and
   * serialising operations; writes wait for it): for read-then-write operations such as
   * copy-on-read. Pass the hold as `owner` to the writes it makes; release it after.
   */
  serialise(start: number, end: number): Promise<RangeHold> {
    this.enableTracking();
    return this.tracker!.serialise(start, end);
  }

  release(hold: RangeHold): void {
    this.tracker!.release(hold);
  }

  get isFormat(): boolean {
    return this.instance.kind === 'format';
  }

  /** The backing (cow) child, if any. */
  get backing(): ChildEdge | undefined {
    for (const c of this.children.values()) if (c.roles.includes('cow')) return c;
    return undefined;
  }

  /** The child data is filtered to, or the primary child. */
  get primary(): ChildEdge | undefined {
    for (const c of this.children.values()) if (c.roles.includes('primary')) return c;
    return undefined;
  }

  size(): number {
    return this.instance.size();
  }

  allocBuffer(length: number): Uint8Array {
    return this.host.allocBuffer(length);
  }

  releaseBuffer(buf: Uint8Array): void {
    this.host.releaseBuffer(buf);
  }

  // ---------------------------------------------------------------- read

  /** Fills buf with the bytes at offset. */
  read(offset: number, buf: Uint8Array): Promise<void> {
    const length = buf.byteLength;
    const err = checkRequest(this.name, offset, length, this.instance.size());
    if (err) return Promise.reject(err);
    if (length === 0) return Promise.resolve();
    const a = this.align;
    if (a > 1 && (offset % a !== 0 || length % a !== 0)) return this.readUnaligned(offset, buf);
    return this.readAligned(offset, buf);
  }

  private async readUnaligned(offset: number, buf: Uint8Array): Promise<void> {
    const a = this.align;
    const size = this.instance.size();
    const start = offset - (offset % a);
    // A protocol reads whole blocks past its end (a file whose size is not a multiple of
    // the O_DIRECT block: the read comes back short and the rest is zeros); other nodes
    // stop at their end.
    const alignedEnd = Math.ceil((offset + buf.byteLength) / a) * a;
    const end = isProtocol(this.instance) ? alignedEnd : Math.min(alignedEnd, size);
    const bounce = this.allocBuffer(end - start);
    try {
      await this.readAligned(start, bounce.subarray(0, end - start));
      buf.set(bounce.subarray(offset - start, offset - start + buf.byteLength));
    } finally {
      this.releaseBuffer(bounce);
    }
  }

  private readAligned(offset: number, buf: Uint8Array): Promise<void> {
    const inst = this.instance;
    if (inst.kind === 'format') return this.readFormat(inst, offset, buf);
    if (buf.byteLength > this.maxTransfer) return this.readSplit(offset, buf);
    if (isProtocol(inst)) return inst.pread(buf, offset);
    return this.readFilter(inst, offset, buf);
  }

  private async readSplit(offset: number, buf: Uint8Array): Promise<void> {
    const max = this.maxTransfer;
    for (let pos = 0; pos < buf.byteLength; pos += max) {
      const sub = buf.subarray(pos, Math.min(pos + max, buf.byteLength));
      const inst = this.instance;
      if (isProtocol(inst)) await inst.pread(sub, offset + pos);
      else if (inst.kind === 'filter') await this.readFilter(inst, offset + pos, sub);
    }
  }

  private async readFilter(inst: FilterInstance, offset: number, buf: Uint8Array): Promise<void> {
    if (inst.intercept) await inst.intercept({ op: 'read', offset, length: buf.byteLength });
    if (inst.read) return inst.read(offset, buf);
    return inst.child.node.read(offset, buf);
  }

  private readFormat(inst: FormatInstance, offset: number, buf: Uint8Array): Promise<void> {
    const m = inst.map(offset, buf.byteLength, 'read');
    if (!(m instanceof Promise) && m.length === buf.byteLength) {
      // One synchronous answer for the whole request (raw): no extra await on the hot path.
      return this.readMapping(m, offset, buf);
    }
    return this.readFormatLoop(inst, offset, buf, m);
  }

  private async readFormatLoop(
    inst: FormatInstance,
    offset: number,
    buf: Uint8Array,
    first: Mapping | Promise<Mapping>,
  ): Promise<void> {
    let pos = 0;
    let next: Mapping | Promise<Mapping> | undefined = first;
    while (pos < buf.byteLength) {
      const m: Mapping = await (next ?? inst.map(offset + pos, buf.byteLength - pos, 'read'));
      next = undefined;
      const len = this.mappingLength(m, buf.byteLength - pos);
      await this.readMapping(m, offset + pos, buf.subarray(pos, pos + len));
      pos += len;
    }
  }

  private mappingLength(m: Mapping, asked: number): number {
    if (!Number.isSafeInteger(m.length) || m.length <= 0 || m.length > asked) {
      throw new BlockError(
        BlockErrorCode.CORRUPT_IMAGE,
        `node '${this.name}': driver '${this.driver}' mapped ${m.length} bytes of ${asked}`,
      );
    }
    return m.length;
  }

  private readMapping(m: Mapping, offset: number, buf: Uint8Array): Promise<void> {
    switch (m.kind) {
      case 'data':
        if (m.read) return m.read(offset, buf);
        return readChildClamped(m.child!.node, m.offset!, buf);
      case 'zero':
        buf.fill(0);
        return Promise.resolve();
      default:
        return this.readBelow(offset, buf);
    }
  }

  /** What a range reads as below this layer: the backing chain, zeros past its end or without one. */
  readBelow(offset: number, buf: Uint8Array): Promise<void> {
    const backing = this.backing;
    if (!backing) {
      buf.fill(0);
      return Promise.resolve();
    }
    return readChildClamped(backing.node, offset, buf);
  }

  /**
   * Reads a range as data and holes in one pass (an NBD READ, under one hold of the
   * graph lock): a format node maps each range once, reads its data into buffers from
   * `alloc` and reports zero clusters and what is unallocated down the chain as holes; a
   * filter that does not transform reads passes it on; anything else is one piece of
   * data. Only what is cheap to know is a hole (as blockStatus with wantZero false).
   * Settles once no read into a buffer is running.
   */
  async readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    const err = checkRequest(this.name, offset, length, this.instance.size());
    if (err) throw err;
    const inst = this.instance;
    const a = this.align;
    if (inst.kind === 'filter' && !inst.read && inst.child.node instanceof BlockNode) {
      if (inst.intercept) await inst.intercept({ op: 'read', offset, length });
      return inst.child.node.readSparse(offset, length, alloc);
    }
    if (inst.kind !== 'format' || (a > 1 && (offset % a !== 0 || length % a !== 0))) {
      const data = alloc(length);
      await this.read(offset, data);
      return [{ offset, length, data }];
    }
    // Map the whole range first, so that adjacent data runs read into one buffer.
    const end = offset + length;
    const runs: Array<{ pos: number; len: number; m?: Mapping; below?: BlockNode }> = [];
    for (let pos = offset; pos < end; ) {
      const m = await inst.map(pos, end - pos, 'read');
      const len = this.mappingLength(m, end - pos);
      const backing = m.kind === 'unallocated' ? this.backing?.node : undefined;
      const below = backing ? Math.max(0, Math.min(len, backing.size() - pos)) : 0;
      if (m.kind === 'data') runs.push({ pos, len, m });
      else if (below > 0) runs.push({ pos, len: below, below: backing! });
      if (below < len && m.kind !== 'data') runs.push({ pos: pos + below, len: len - below });
      pos += len;
    }
    const out: SparsePiece[] = [];
    const push = (p: SparsePiece): void => {
      const last = out[out.length - 1];
      if (!p.data && last && !last.data) last.length += p.length;
      else out.push(p);
    };
    for (let i = 0; i < runs.length; ) {
      const r = runs[i]!;
      if (r.below) {
        for (const p of await r.below.readSparse(r.pos, r.len, alloc)) push(p);
        i++;
      } else if (!r.m) {
        push({ offset: r.pos, length: r.len });
        i++;
      } else {
        let j = i;
        let n = 0;
        while (j < runs.length && runs[j]!.m) n += runs[j++]!.len;
        const data = alloc(n);
        for (; i < j; i++) {
          const d = runs[i]!;
          await this.readMapping(d.m!, d.pos, data.subarray(d.pos - r.pos, d.pos - r.pos + d.len));
        }
        out.push({ offset: r.pos, length: n, data });
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- write

  /** Writes buf at offset; with fua, durable when resolved (a flush when not native). */
  write(offset: number, buf: Uint8Array, flags: WriteFlags = {}): Promise<void> {
    const length = buf.byteLength;
    const err = this.checkWrite(offset, length, true);
    if (err) return Promise.reject(err);
    if (length === 0) return Promise.resolve();
    if (flags.fua) return this.writeThenFlush(offset, buf, flags.owner);
    if (this.settings.detectZeroes !== 'off' && isZero(buf)) {
      return this.writeZeroes(offset, length, {
        mayUnmap: this.settings.detectZeroes === 'unmap',
      });
    }
    const a = this.align;
    if (a > 1 && (offset % a !== 0 || length % a !== 0)) {
      return this.writeUnaligned(offset, buf, flags.owner);
    }
    if (this.tracker) return this.writeTracked(offset, buf, flags.owner);
    return this.writeAligned(offset, buf);
  }

  private async writeThenFlush(offset: number, buf: Uint8Array, owner?: RangeHold): Promise<void> {
    await this.write(offset, buf, owner ? { owner } : {});
    await this.flush();
  }

  private checkWrite(offset: number, length: number, grow = false): BlockError | undefined {
    if (this.settings.readOnly) {
      return new BlockError(BlockErrorCode.READ_ONLY, `node '${this.name}' is read-only`);
    }
    // A protocol node grows when written past its end, if a parent holds 'resize' (a format
    // allocating at the end of its file).
    const limit = grow && this.canGrow ? Number.MAX_SAFE_INTEGER : this.instance.size();
    return checkRequest(this.name, offset, length, limit);
  }

  private get canGrow(): boolean {
    return isProtocol(this.instance) && (this.perm & BLK_PERM_RESIZE) !== 0;
  }

  /** Sets the size of a protocol node (a parent must hold 'resize'). */
  async truncate(size: number): Promise<void> {
    const inst = this.instance;
    if (this.settings.readOnly)
      throw new BlockError(BlockErrorCode.READ_ONLY, `node '${this.name}' is read-only`);
    if (!Number.isSafeInteger(size) || size < 0) throw outOfBounds(this.name, size, 0, this.size());
    if (!isProtocol(inst) || !inst.truncate) throw this.notSupported('truncate');
    if (!this.canGrow) {
      throw new BlockError(
        BlockErrorCode.PERMISSION_CONFLICT,
        `no parent of node '${this.name}' holds 'resize'`,
      );
    }
    await this.wrap(inst.truncate(size));
  }

  private async writeTracked(offset: number, buf: Uint8Array, owner?: RangeHold): Promise<void> {
    const t = this.tracker!;
    const hold = await t.write(offset, offset + buf.byteLength, owner);
    try {
      await this.writeAligned(offset, buf);
    } finally {
      t.release(hold);
    }
  }

  /** Read-modify-write of the aligned blocks around an unaligned write, serialised. */
  private async writeUnaligned(offset: number, buf: Uint8Array, owner?: RangeHold): Promise<void> {
    const a = this.align;
    const size = this.instance.size();
    const length = buf.byteLength;
    const start = offset - (offset % a);
    const alignedEnd = Math.ceil((offset + length) / a) * a;
    // A protocol writes whole blocks, past its end if its size is not a multiple of the
    // block (O_DIRECT on such a file): the size is given back afterwards.
    const protocol = isProtocol(this.instance);
    const end = protocol || offset + length > size ? alignedEnd : Math.min(alignedEnd, size);
    const t = this.tracker!;
    const hold = await t.serialise(start, end, owner);
    const bounce = this.allocBuffer(end - start);
    try {
      const b = bounce.subarray(0, end - start);
      const headEnd = Math.min(start + a, end);
      if (offset > start) await this.readAligned(start, b.subarray(0, headEnd - start));
      const tailStart = Math.max(end - a, start);
      if (offset + length < end && !(offset > start && tailStart < headEnd)) {
        await this.readAligned(tailStart, b.subarray(tailStart - start));
      }
      b.set(buf, offset - start);
      await this.writeAligned(start, b);
      const inst = this.instance;
      if (isProtocol(inst) && end > size && offset + length <= size && inst.truncate) {
        // Nobody may grow this node (writes past its end are refused without 'resize'), so
        // cutting back to the old size cuts nothing but the padding. With 'resize' (a
        // format's file), the padding stays: the format owns the end of its file.
        if (!this.canGrow) await this.wrap(inst.truncate(size));
      }
    } finally {
      this.releaseBuffer(bounce);
      t.release(hold);
    }
  }

  private writeAligned(offset: number, buf: Uint8Array): Promise<void> {
    const inst = this.instance;
    if (inst.kind === 'format') return this.writeFormat(inst, offset, buf);
    if (buf.byteLength > this.maxTransfer) return this.writeSplit(offset, buf);
    if (isProtocol(inst)) return this.pwrite(inst, offset, buf);
    return this.writeFilter(inst, offset, buf);
  }

  private pwrite(inst: ProtocolInstance, offset: number, buf: Uint8Array): Promise<void> {
    if (!inst.pwrite) {
      return Promise.reject(
        new BlockError(BlockErrorCode.READ_ONLY, `driver '${this.driver}' cannot write`),
      );
    }
    return inst.pwrite(buf, offset);
  }

  private async writeSplit(offset: number, buf: Uint8Array): Promise<void> {
    const max = this.maxTransfer;
    for (let pos = 0; pos < buf.byteLength; pos += max) {
      const sub = buf.subarray(pos, Math.min(pos + max, buf.byteLength));
      const inst = this.instance;
      if (isProtocol(inst)) await this.pwrite(inst, offset + pos, sub);
      else if (inst.kind === 'filter') await this.writeFilter(inst, offset + pos, sub);
    }
  }

  private async writeFilter(inst: FilterInstance, offset: number, buf: Uint8Array): Promise<void> {
    if (inst.intercept) await inst.intercept({ op: 'write', offset, length: buf.byteLength });
    return inst.child.node.write(offset, buf);
  }

  private writeFormat(inst: FormatInstance, offset: number, buf: Uint8Array): Promise<void> {
    const m = inst.map(offset, buf.byteLength, 'write');
    if (
      !(m instanceof Promise) &&
      m.length === buf.byteLength &&
      !m.allocation &&
      m.kind === 'data'
    ) {
      return m.child!.node.write(m.offset!, buf);
    }
    return this.writeFormatLoop(inst, offset, buf, m);
  }

  private async writeFormatLoop(
    inst: FormatInstance,
    offset: number,
    buf: Uint8Array,
    first: Mapping | Promise<Mapping>,
  ): Promise<void> {
    let pos = 0;
    let next: Mapping | Promise<Mapping> | undefined = first;
    while (pos < buf.byteLength) {
      const m: Mapping = await (next ?? inst.map(offset + pos, buf.byteLength - pos, 'write'));
      next = undefined;
      const len = this.mappingLength(m, buf.byteLength - pos);
      if (m.kind !== 'data' || !m.child || m.offset === undefined) {
        throw new BlockError(
          BlockErrorCode.CORRUPT_IMAGE,
          `node '${this.name}': driver '${this.driver}' did not map a write to data`,
        );
      }
      const sub = buf.subarray(pos, pos + len);
      if (m.allocation) await this.writeAllocating(m, offset + pos, sub);
      else await m.child.node.write(m.offset, sub);
      pos += len;
    }
  }

  /** Copy on write into a freshly allocated unit, then link it (Mapping.allocation). */
  /**
   * A write into a new allocation: copy on write of the rest of it from below (or zeros),
   * the data, then commit. Any failure before commit aborts the allocation, so that the
   * driver releases what it holds (qcow2: the cluster locks) and nothing is left pending.
   */
  private async writeAllocating(m: Mapping, offset: number, buf: Uint8Array): Promise<void> {
    const alloc = m.allocation!;
    const { start, end } = alloc;
    let bounce: Uint8Array | undefined;
    let committing = false;
    try {
      if (start > offset || end < offset + buf.byteLength) {
        throw new BlockError(
          BlockErrorCode.CORRUPT_IMAGE,
          `node '${this.name}': allocation [${start}, ${end}) does not contain the write`,
        );
      }
      const hostStart = m.offset! - (offset - start);
      let data = buf;
      if (start < offset || end > offset + buf.byteLength) {
        bounce = this.allocBuffer(end - start);
        data = bounce.subarray(0, end - start);
        const head = data.subarray(0, offset - start);
        const tail = data.subarray(offset - start + buf.byteLength);
        if (alloc.from === 'below') {
          if (head.byteLength) await this.readBelow(start, head);
          if (tail.byteLength) await this.readBelow(offset + buf.byteLength, tail);
        } else {
          head.fill(0);
          tail.fill(0);
        }
        data.set(buf, offset - start);
      }
      await m.child!.node.write(hostStart, data);
      committing = true;
      await alloc.commit();
    } catch (err) {
      if (!committing && alloc.abort) await alloc.abort(err);
      throw err;
    } finally {
      if (bounce) this.releaseBuffer(bounce);
    }
  }

  // ---------------------------------------------------------------- zeroes, discard, flush

  /** Writes zeros: natively where the driver can, else by writing zero buffers. */
  async writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    const err = this.checkWrite(offset, length);
    if (err) throw err;
    if (length === 0) return;
    const mayUnmap = !!flags.mayUnmap && this.settings.discard === 'unmap';
    const inst = this.instance;
    const fast = !!flags.fastZero;
    if (isProtocol(inst)) {
      await this.zeroProtocol(inst, offset, length, mayUnmap, fast);
    } else if (inst.kind === 'filter') {
      try {
        if (inst.intercept) await inst.intercept({ op: 'write-zeroes', offset, length });
        await inst.child.node.writeZeroes(offset, length, { mayUnmap, fastZero: fast });
      } catch (err) {
        // Not supported below (or refused by the filter): write zero buffers through here.
        if (fast || !isNotSupported(err)) throw err;
        await this.writeZeroBuffers(offset, length);
      }
    } else if (inst.writeZeroes) {
      try {
        await this.wrap(inst.writeZeroes(offset, length, mayUnmap));
      } catch (err) {
        if (!isNotSupported(err)) throw err;
        await this.zeroFormat(inst, offset, length, mayUnmap, fast);
      }
    } else {
      await this.zeroFormat(inst, offset, length, mayUnmap, fast);
    }
    if (flags.fua) await this.flush();
  }

  private async zeroProtocol(
    inst: ProtocolInstance,
    offset: number,
    length: number,
    mayUnmap: boolean,
    fast: boolean,
  ): Promise<void> {
    if (inst.writeZeroes) {
      const a = this.align;
      // [offset, start) and [end, stop) are partial blocks, [start, end) whole ones.
      const stop = offset + length;
      const start = Math.min(Math.ceil(offset / a) * a, stop);
      const end = Math.max(start, Math.floor(stop / a) * a);
      try {
        if (end > start) {
          const hold = this.tracker ? await this.tracker.write(start, end) : undefined;
          try {
            await this.wrap(inst.writeZeroes(start, end - start, mayUnmap));
          } finally {
            if (hold) this.tracker!.release(hold);
          }
        }
        if (start > offset) await this.writeZeroBuffers(offset, start - offset);
        if (stop > end) await this.writeZeroBuffers(end, stop - end);
        return;
      } catch (err) {
        if (!isNotSupported(err)) throw err;
      }
    }
    if (fast) throw this.notSupported('fast zeroing');
    await this.writeZeroBuffers(offset, length);
  }

  private async zeroFormat(
    inst: FormatInstance,
    offset: number,
    length: number,
    mayUnmap: boolean,
    fast: boolean,
  ): Promise<void> {
    let pos = 0;
    while (pos < length) {
      const m = await inst.map(offset + pos, length - pos, 'read');
      const len = this.mappingLength(m, length - pos);
      if (m.kind === 'data' && !m.read) {
        await m.child!.node.writeZeroes(m.offset!, len, { mayUnmap, fastZero: fast });
      } else if (m.kind === 'data' || (m.kind === 'unallocated' && this.backing)) {
        if (fast) {
          throw this.notSupported(
            m.kind === 'data'
              ? 'fast zeroing of driver-read data'
              : 'fast zeroing over a backing file',
          );
        }
        await this.writeZeroBuffers(offset + pos, len);
      }
      // zero, or unallocated without backing: already reads as zeros.
      pos += len;
    }
  }

  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const chunk = Math.min(ZERO_CHUNK, this.maxTransfer);
    for (let pos = 0; pos < length; pos += chunk) {
      const n = Math.min(chunk, length - pos);
      const a = this.align;
      if (a > 1 && ((offset + pos) % a !== 0 || n % a !== 0)) {
        await this.writeUnaligned(offset + pos, zeros(n));
      } else {
        // O_DIRECT needs arena memory: copy the zeros into a bounce buffer there.
        const buf = a > 1 ? this.allocBuffer(n) : undefined;
        try {
          const data = buf ? buf.subarray(0, n).fill(0) : zeros(n);
          if (this.tracker) await this.writeTracked(offset + pos, data);
          else await this.writeAligned(offset + pos, data);
        } finally {
          if (buf) this.releaseBuffer(buf);
        }
      }
    }
  }

  /** Discards a range where the node's `discard` option is 'unmap'; a no-op otherwise. */
  async discard(offset: number, length: number): Promise<void> {
    const err = this.checkWrite(offset, length);
    if (err) throw err;
    if (length === 0 || this.settings.discard !== 'unmap') return;
    const inst = this.instance;
    if (isProtocol(inst)) {
      if (!inst.discard) return;
      const a = this.align;
      const start = Math.ceil(offset / a) * a;
      const end = Math.floor((offset + length) / a) * a;
      if (end > start) await this.wrap(inst.discard(start, end - start));
    } else if (inst.kind === 'filter') {
      if (inst.intercept) await inst.intercept({ op: 'discard', offset, length });
      await inst.child.node.discard(offset, length);
    } else if (inst.discard) {
      await this.wrap(inst.discard(offset, length));
    } else {
      let pos = 0;
      while (pos < length) {
        const m = await inst.map(offset + pos, length - pos, 'read');
        const len = this.mappingLength(m, length - pos);
        if (m.kind === 'data' && !m.read) await m.child!.node.discard(m.offset!, len);
        pos += len;
      }
    }
  }

  /** Makes completed writes durable: the driver's own cache first, then the children it writes. */
  async flush(): Promise<void> {
    const inst = this.instance;
    if (inst.kind === 'filter' && inst.intercept) {
      await inst.intercept({ op: 'flush', offset: 0, length: 0 });
    }
    if (inst.kind === 'format' && inst.flush) await this.wrap(inst.flush());
    if (isProtocol(inst) && inst.flush && !this.settings.noFlush) await this.wrap(inst.flush());
    const writers: Promise<void>[] = [];
    for (const c of this.children.values()) if (c.perm & 0x06) writers.push(c.node.flush());
    await Promise.all(writers);
  }

  // ---------------------------------------------------------------- block status

  /**
   * Status of [offset, offset + length) from offset on (one extent, at least one byte).
   * wantZero false: allocation is enough, so protocol nodes answer data without asking
   * their driver (QEMU's want_zero).
   */
  async blockStatus(offset: number, length: number, wantZero = true): Promise<Status> {
    const size = this.instance.size();
    const err = checkRequest(this.name, offset, length, size);
    if (err) throw err;
    if (length === 0) throw outOfBounds(this.name, offset, length, size);
    const inst = this.instance;
    if (isProtocol(inst)) {
      if (!inst.blockStatus || !wantZero) return { length, hole: false, zero: false, depth: 1 };
      const s = await this.wrap(inst.blockStatus(offset, length));
      return { length: clampLength(s.length, length), hole: s.hole, zero: s.zero, depth: 1 };
    }
    if (inst.kind === 'filter') {
      if (inst.intercept) await inst.intercept({ op: 'block-status', offset, length });
      return inst.child.node.blockStatus(offset, length, wantZero);
    }
    const m = await inst.map(offset, length, 'read');
    const len = this.mappingLength(m, length);
    if (m.kind === 'zero') return { length: len, hole: true, zero: true, depth: 1 };
    if (m.kind === 'data' && m.read) return { length: len, hole: false, zero: false, depth: 1 };
    if (m.kind === 'data') {
      const child = m.child!.node;
      const childSize = child.size();
      if (m.offset! >= childSize)
        return { length: len, hole: !!m.passthrough, zero: true, depth: 1 };
      const s = await child.blockStatus(m.offset!, Math.min(len, childSize - m.offset!), wantZero);
      if (m.passthrough) return { length: s.length, hole: s.hole, zero: s.zero, depth: 1 };
      return { length: s.length, hole: false, zero: s.zero, depth: 1 };
    }
    const backing = this.backing;
    if (!backing) return { length: len, hole: true, zero: true, depth: 0 };
    const bsize = backing.node.size();
    if (offset >= bsize) return { length: len, hole: true, zero: true, depth: 0 };
    const s = await backing.node.blockStatus(offset, Math.min(len, bsize - offset), wantZero);
    return { length: s.length, hole: s.hole, zero: s.zero, depth: s.depth === 0 ? 0 : s.depth + 1 };
  }

  // ---------------------------------------------------------------- helpers

  private notSupported(what: string): BlockError {
    return new BlockError(
      BlockErrorCode.NOT_SUPPORTED,
      `node '${this.name}': ${what} is not supported`,
    );
  }

  /** Errors from a driver become ours (errno kept), never thrown on the caller's stack. */
  private wrap<T>(p: Promise<T>): Promise<T> {
    return p.catch((err: unknown) => {
      throw toBlockError(err, this.name);
    });
  }
}

/** A protocol instance (its `kind` may be left out: the smallest driver is size and pread). */
function isProtocol(inst: DriverInstance): inst is ProtocolInstance {
  return inst.kind !== 'format' && inst.kind !== 'filter';
}

function isNotSupported(err: unknown): boolean {
  return (
    err instanceof BlockError && (err.errnoName === 'ENOTSUP' || err.errnoName === 'EOPNOTSUPP')
  );
}

function clampLength(n: number, max: number): number {
  return Number.isSafeInteger(n) && n > 0 && n <= max ? n : max;
}

/** Reads from a child, zeros for what lies past its end (as a protocol reads past EOF). */
function readChildClamped(node: ChildNode, offset: number, buf: Uint8Array): Promise<void> {
  const size = node.size();
  const length = buf.byteLength;
  if (offset + length <= size) return node.read(offset, buf);
  if (offset >= size) {
    buf.fill(0);
    return Promise.resolve();
  }
  buf.fill(0, size - offset);
  return node.read(offset, buf.subarray(0, size - offset));
}
