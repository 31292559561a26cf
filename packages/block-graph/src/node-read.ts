// The read side of the generic I/O layer (QEMU's block/io.c): bounds, alignment with a
// bounce buffer, splitting at max transfer, a format's mappings (data in a child, zeros,
// or the backing chain below), and block status along the chain. The write side builds on
// it (node-write.ts); BlockNode (node.ts) provides the node it works on.

import type {
  BdrvChild,
  ChildNode,
  DriverInstance,
  FileRange,
  FilterInstance,
  FormatInstance,
  MapIntent,
  Mapping,
  Status,
} from './driver.ts';
import { BlockError, BlockErrorCode, toBlockError } from './errors.ts';
import {
  checkRequest,
  clampLength,
  isProtocol,
  mappedInChild,
  outOfBounds,
  readChildClamped,
} from './io-request.ts';
import { ACCT_READ, BlockAcctStats } from './node-stats.ts';

/** A piece of a sparse read: data read, or (without data) a hole reading as zeros. */
export interface SparsePiece {
  offset: number;
  length: number;
  data?: Uint8Array;
}

export abstract class NodeRead {
  abstract readonly name: string;
  abstract readonly driver: string;
  abstract instance: DriverInstance;
  abstract align: number;
  abstract maxTransfer: number;
  /** The backing (cow) child, if any. */
  abstract get backing(): BdrvChild | undefined;
  abstract size(): number;
  abstract allocBuffer(length: number): Uint8Array;
  abstract releaseBuffer(buf: Uint8Array): void;
  /** The node's I/O accounting: each request a parent makes (not the node's own inner ones). */
  readonly stats = new BlockAcctStats();

  // ---------------------------------------------------------------- read

  /** Fills buf with the bytes at offset. */
  read(offset: number, buf: Uint8Array): Promise<void> {
    const t0 = this.stats.start(ACCT_READ);
    return this.stats.track(ACCT_READ, t0, buf.byteLength, 0, this.readRequest(offset, buf));
  }

  private readRequest(offset: number, buf: Uint8Array): Promise<void> {
    const length = buf.byteLength;
    const err = checkRequest(this.name, offset, length, this.instance.size());
    if (err) return Promise.reject(err);
    if (length === 0) return Promise.resolve();
    const a = this.align;
    if (a > 1 && (offset % a !== 0 || length % a !== 0)) return this.readUnaligned(offset, buf);
    return this.readAligned(offset, buf);
  }

  /**
   * Where [offset, offset + length) lives, whole, in a host file whose pages are cached:
   * for a server to send the bytes from there (sendfile) instead of reading them. Only
   * where a read would read that one range of that one file and nothing else: a protocol
   * that says so (the file driver, buffered), or a format's synchronous data mapping (raw;
   * qcow2 with its L2 table cached) onto such a child; not through filters, zeros, the
   * backing chain, compressed data, nor a mapping still to be loaded. Counted as a read
   * on each node it passes. Preconditions as read's.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    const inst = this.instance;
    let range: FileRange | undefined;
    if (isProtocol(inst)) {
      range = inst.fileRange?.(offset, length);
    } else if (inst.kind === 'format') {
      const m = inst.map(offset, length, 'read');
      if (m instanceof Promise) {
        m.catch(() => {}); // the read that follows asks again, and reports any failure
        return undefined;
      }
      const at = mappedInChild(m, length);
      if (at === undefined || at.length !== length) return undefined;
      range = at.node.fileRange(at.offset, length);
    }
    if (range !== undefined) this.stats.done(ACCT_READ, this.stats.start(ACCT_READ), length);
    return range;
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

  protected readAligned(offset: number, buf: Uint8Array): Promise<void> {
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
    return this.mapEach(inst, offset, buf.byteLength, 'read', m, (m, pos, len) =>
      this.readMapping(m, offset + pos, buf.subarray(pos, pos + len)),
    );
  }

  /**
   * Walks the driver's mappings of [offset, offset + length) (`first`: the first one,
   * already asked for), calling `each` with each mapping, its position and its length.
   */
  protected async mapEach(
    inst: FormatInstance,
    offset: number,
    length: number,
    intent: MapIntent,
    first: Mapping | Promise<Mapping>,
    each: (m: Mapping, pos: number, len: number) => Promise<void>,
  ): Promise<void> {
    let pos = 0;
    let next: Mapping | Promise<Mapping> | undefined = first;
    while (pos < length) {
      const m: Mapping = await (next ?? inst.map(offset + pos, length - pos, intent));
      next = undefined;
      const len = this.mappingLength(m, length - pos);
      await each(m, pos, len);
      pos += len;
    }
  }

  protected mappingLength(m: Mapping, asked: number): number {
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
  readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    const t0 = this.stats.start(ACCT_READ);
    const p = this.readSparseRequest(offset, length, alloc);
    return this.stats.track(ACCT_READ, t0, length, 0, p);
  }

  private async readSparseRequest(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    const err = checkRequest(this.name, offset, length, this.instance.size());
    if (err) throw err;
    const inst = this.instance;
    const a = this.align;
    if (inst.kind === 'filter' && !inst.read && inst.child.node instanceof NodeRead) {
      if (inst.intercept) await inst.intercept({ op: 'read', offset, length });
      return inst.child.node.readSparse(offset, length, alloc);
    }
    if (inst.kind !== 'format' || (a > 1 && (offset % a !== 0 || length % a !== 0))) {
      const data = alloc(length);
      await this.readRequest(offset, data);
      return [{ offset, length, data }];
    }
    // Map the whole range first, so that adjacent data runs read into one buffer.
    const end = offset + length;
    const runs: Array<{ pos: number; len: number; m?: Mapping; below?: ChildNode }> = [];
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
      if (r.below instanceof NodeRead) {
        for (const p of await r.below.readSparse(r.pos, r.len, alloc)) push(p);
        i++;
      } else if (r.below) {
        const data = alloc(r.len);
        await readChildClamped(r.below, r.pos, data);
        out.push({ offset: r.pos, length: r.len, data });
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

  // ---------------------------------------------------------------- block status

  /**
   * Status of [offset, offset + length) from offset on (one extent, at least one byte).
   * wantZero false: allocation is enough, so protocol nodes answer data without asking
   * their driver (QEMU's want_zero).
   */
  blockStatus(offset: number, length: number, wantZero = true): Promise<Status> {
    const inst = this.instance;
    let m: Mapping | Promise<Mapping>;
    try {
      const size = inst.size();
      const err =
        checkRequest(this.name, offset, length, size) ??
        (length === 0 ? outOfBounds(this.name, offset, length, size) : undefined);
      if (err) return Promise.reject(err);
      if (inst.kind !== 'format') return this.blockStatusAsync(offset, length, wantZero);
      m = inst.map(offset, length, 'read');
    } catch (e) {
      return Promise.reject(e);
    }
    if (m instanceof Promise || m.length <= 0 || m.length > length) {
      return this.blockStatusAsync(offset, length, wantZero, m);
    }
    // A synchronous mapping to zeros, or (allocation is enough) to data in a protocol
    // node: the answer without an await (a backup asks once per cluster it copies).
    const len = m.length;
    if (m.kind === 'zero')
      return Promise.resolve({ length: len, hole: true, zero: true, depth: 1 });
    const at = wantZero ? undefined : mappedInChild(m, len);
    if (at?.node instanceof NodeRead && isProtocol(at.node.instance)) {
      return Promise.resolve({ length: len, hole: false, zero: false, depth: 1 });
    }
    return this.blockStatusAsync(offset, length, wantZero, m);
  }

  /**
   * blockStatus once the request is checked; `first`: the format's mapping of offset,
   * when already asked for.
   */
  private async blockStatusAsync(
    offset: number,
    length: number,
    wantZero: boolean,
    first?: Mapping | Promise<Mapping>,
  ): Promise<Status> {
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
    const m = await (first ?? inst.map(offset, length, 'read'));
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

  protected notSupported(what: string): BlockError {
    return new BlockError(
      BlockErrorCode.NOT_SUPPORTED,
      `node '${this.name}': ${what} is not supported`,
    );
  }

  /** Errors from a driver become ours (errno kept), never thrown on the caller's stack. */
  protected wrap<T>(p: Promise<T>): Promise<T> {
    return p.catch((err: unknown) => {
      throw toBlockError(err, this.name);
    });
  }
}
