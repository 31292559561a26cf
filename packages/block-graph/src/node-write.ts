// The write side of the generic I/O layer (QEMU's block/io.c): read-only and bounds
// checks (a protocol grows with 'resize'), FUA and zero detection, read-modify-write of
// unaligned writes, serialising overlapping writes, splitting, a format's allocations
// (copy on write, then commit), write-zeroes (native or zero buffers), discard and flush.

import type {
  BdrvChild,
  ChildNode,
  FilterInstance,
  FormatInstance,
  Mapping,
  ProtocolInstance,
  WriteFlags,
  ZeroFlags,
} from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import {
  checkRequest,
  isNotSupported,
  isProtocol,
  isZero,
  outOfBounds,
  ZERO_CHUNK,
  zeros,
} from './io-request.ts';
import { NodeRead } from './node-read.ts';
import type { NodeSettings } from './node-settings.ts';
import { ACCT_DISCARD, ACCT_FLUSH, ACCT_WRITE, ACCT_ZERO } from './node-stats.ts';
import { BLK_PERM_RESIZE } from './permissions.ts';
import type { RangeHold, RangeLock } from './range-lock.ts';

export abstract class NodeWrite extends NodeRead {
  abstract readonly settings: NodeSettings;
  /** Cumulative permissions of the parents. */
  abstract perm: number;
  abstract readonly children: ReadonlyMap<string, BdrvChild & { readonly perm: number }>;
  /** Serialises overlapping writes, when the node needs it (see BlockNode). */
  protected tracker: RangeLock | undefined;

  // ---------------------------------------------------------------- write

  /** Writes buf at offset; with fua, durable when resolved (a flush when not native). */
  write(offset: number, buf: Uint8Array, flags: WriteFlags = {}): Promise<void> {
    const t0 = this.stats.start(ACCT_WRITE);
    const p = this.writeRequest(offset, buf, flags);
    return this.stats.track(ACCT_WRITE, t0, buf.byteLength, offset + buf.byteLength, p);
  }

  /**
   * Writes one cluster compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED: qemu-img convert -c,
   * backup with compress): checked, serialised with overlapping writes, accounted and
   * marked in the dirty bitmaps as any write. `offset` aligned to the format's
   * compressedUnit, `buf` one unit (the disk's last may be shorter).
   */
  writeCompressed(offset: number, buf: Uint8Array): Promise<void> {
    const t0 = this.stats.start(ACCT_WRITE);
    const p = this.writeCompressedRequest(offset, buf);
    return this.stats.track(ACCT_WRITE, t0, buf.byteLength, offset + buf.byteLength, p);
  }

  private async writeCompressedRequest(offset: number, buf: Uint8Array): Promise<void> {
    const err = this.checkWrite(offset, buf.byteLength);
    if (err) throw err;
    const inst = this.instance;
    if (inst.kind !== 'format' || !inst.writeCompressed) {
      throw new BlockError(
        BlockErrorCode.NOT_SUPPORTED,
        'Compression not supported for this file format',
      );
    }
    const t = this.tracker;
    const hold = t ? await t.write(offset, offset + buf.byteLength) : undefined;
    try {
      await this.wrap(inst.writeCompressed(offset, buf));
    } finally {
      if (hold) t!.release(hold);
    }
  }

  private writeRequest(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void> {
    const length = buf.byteLength;
    const err = this.checkWrite(offset, length, true);
    if (err) return Promise.reject(err);
    if (length === 0) return Promise.resolve();
    if (flags.fua) return this.writeThenFlush(offset, buf, flags.owner);
    if (this.settings.detectZeroes !== 'off' && isZero(buf)) {
      return this.writeZeroesRequest(offset, length, {
        mayUnmap: this.settings.detectZeroes === 'unmap',
        ...(flags.owner && { owner: flags.owner }),
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
    await this.writeRequest(offset, buf, owner ? { owner } : {});
    await this.flushRequest();
  }

  protected checkWrite(offset: number, length: number, grow = false): BlockError | undefined {
    if (this.settings.readOnly) {
      return new BlockError(BlockErrorCode.READ_ONLY, `node '${this.name}' is read-only`);
    }
    // A protocol node grows when written past its end, if a parent holds 'resize' (a format
    // allocating at the end of its file).
    const limit = grow && this.canGrow ? Number.MAX_SAFE_INTEGER : this.instance.size();
    return checkRequest(this.name, offset, length, limit);
  }

  private get canGrow(): boolean {
    if ((this.perm & BLK_PERM_RESIZE) === 0) return false;
    const inst = this.instance;
    if (isProtocol(inst)) return true;
    // A filter passes a write past its end on to its child (blkdebug under a format).
    return (
      inst.kind === 'filter' && inst.child.node instanceof NodeWrite && inst.child.node.canGrow
    );
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
    if (inst.write) return inst.write(offset, buf);
    return inst.child.node.write(offset, buf);
  }
  private writeFormat(inst: FormatInstance, offset: number, buf: Uint8Array): Promise<void> {
    const m = inst.map(offset, buf.byteLength, 'write');
    if (m instanceof Promise) return this.writeFormatLater(inst, offset, buf, m);
    return this.writeFormatMapped(inst, offset, buf, m);
  }

  private async writeFormatLater(
    inst: FormatInstance,
    offset: number,
    buf: Uint8Array,
    m: Promise<Mapping>,
  ): Promise<void> {
    return this.writeFormatMapped(inst, offset, buf, await m);
  }

  /** One mapping for the whole request (the usual case): no walk, no closure per request. */
  private writeFormatMapped(
    inst: FormatInstance,
    offset: number,
    buf: Uint8Array,
    m: Mapping,
  ): Promise<void> {
    if (m.length === buf.byteLength && m.kind === 'data' && m.child && m.offset !== undefined) {
      if (m.allocation) return this.writeAllocating(m, offset, buf);
      return m.child.node.write(m.offset, buf);
    }
    return this.mapEach(inst, offset, buf.byteLength, 'write', m, async (m, pos, len) => {
      if (m.kind !== 'data' || !m.child || m.offset === undefined) {
        throw new BlockError(
          BlockErrorCode.CORRUPT_IMAGE,
          `node '${this.name}': driver '${this.driver}' did not map a write to data`,
        );
      }
      const sub = buf.subarray(pos, pos + len);
      if (m.allocation) await this.writeAllocating(m, offset + pos, sub);
      else await m.child.node.write(m.offset, sub);
    });
  }

  /**
   * A write into a new allocation: copy on write of the rest of it from below (or zeros),
   * the data, then commit. Any failure before commit aborts the allocation, so that the
   * driver releases what it holds (qcow2: the cluster locks) and nothing is left pending.
   */
  private writeAllocating(m: Mapping, offset: number, buf: Uint8Array): Promise<void> {
    const alloc = m.allocation!;
    if (alloc.start === offset && alloc.end === offset + buf.byteLength) {
      return this.writeAllocated(m.child!.node, m.offset!, buf, alloc);
    }
    return this.writeAllocatingCow(m, offset, buf);
  }

  /** The write fills its allocation (a copy of whole clusters): no copy on write. */
  private async writeAllocated(
    child: ChildNode,
    host: number,
    buf: Uint8Array,
    alloc: NonNullable<Mapping['allocation']>,
  ): Promise<void> {
    try {
      await child.write(host, buf);
    } catch (err) {
      if (alloc.abort) await alloc.abort(err);
      throw err;
    }
    await alloc.commit();
  }

  private async writeAllocatingCow(m: Mapping, offset: number, buf: Uint8Array): Promise<void> {
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

  /**
   * Writes zeros: natively where the driver can, else by writing zero buffers. Serialised
   * as a write is (a hold on the range, when the node tracks requests): it waits for a
   * copy-on-read or a stream's copy of the range, so that old data never lands on the zeros.
   */
  writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    const t0 = this.stats.start(ACCT_ZERO);
    const p = this.writeZeroesRequest(offset, length, flags);
    return this.stats.track(ACCT_ZERO, t0, length, offset + length, p);
  }

  private async writeZeroesRequest(
    offset: number,
    length: number,
    flags: ZeroFlags,
  ): Promise<void> {
    const err = this.checkWrite(offset, length);
    if (err) throw err;
    if (length === 0) return;
    const t = this.tracker;
    const hold = t ? await t.write(offset, offset + length, flags.owner) : undefined;
    try {
      await this.zeroes(offset, length, flags, hold);
    } finally {
      if (hold) t!.release(hold);
    }
    if (flags.fua) await this.flushRequest();
  }

  private async zeroes(
    offset: number,
    length: number,
    flags: ZeroFlags,
    owner: RangeHold | undefined,
  ): Promise<void> {
    const mayUnmap = !!flags.mayUnmap && this.settings.discard === 'unmap';
    const inst = this.instance;
    const fast = !!flags.fastZero;
    if (isProtocol(inst)) {
      await this.zeroProtocol(inst, offset, length, mayUnmap, fast, owner);
    } else if (inst.kind === 'filter') {
      try {
        if (inst.intercept) await inst.intercept({ op: 'write-zeroes', offset, length });
        const zf = { mayUnmap, fastZero: fast };
        if (inst.writeZeroes) await inst.writeZeroes(offset, length, zf);
        else await inst.child.node.writeZeroes(offset, length, zf);
      } catch (err) {
        // Not supported below (or refused by the filter): write zero buffers through here.
        if (fast || !isNotSupported(err)) throw err;
        await this.writeZeroBuffers(offset, length, owner);
      }
    } else if (inst.writeZeroes) {
      try {
        await this.wrap(inst.writeZeroes(offset, length, mayUnmap));
      } catch (err) {
        if (!isNotSupported(err)) throw err;
        await this.zeroFormat(inst, offset, length, mayUnmap, fast, owner);
      }
    } else {
      await this.zeroFormat(inst, offset, length, mayUnmap, fast, owner);
    }
  }

  private async zeroProtocol(
    inst: ProtocolInstance,
    offset: number,
    length: number,
    mayUnmap: boolean,
    fast: boolean,
    owner: RangeHold | undefined,
  ): Promise<void> {
    if (inst.writeZeroes) {
      const a = this.align;
      // [offset, start) and [end, stop) are partial blocks, [start, end) whole ones.
      const stop = offset + length;
      const start = Math.min(Math.ceil(offset / a) * a, stop);
      const end = Math.max(start, Math.floor(stop / a) * a);
      try {
        if (end > start) await this.wrap(inst.writeZeroes(start, end - start, mayUnmap));
        if (start > offset) await this.writeZeroBuffers(offset, start - offset, owner);
        if (stop > end) await this.writeZeroBuffers(end, stop - end, owner);
        return;
      } catch (err) {
        if (!isNotSupported(err)) throw err;
      }
    }
    if (fast) throw this.notSupported('fast zeroing');
    await this.writeZeroBuffers(offset, length, owner);
  }

  private async zeroFormat(
    inst: FormatInstance,
    offset: number,
    length: number,
    mayUnmap: boolean,
    fast: boolean,
    owner: RangeHold | undefined,
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
        await this.writeZeroBuffers(offset + pos, len, owner);
      }
      // zero, or unallocated without backing: already reads as zeros.
      pos += len;
    }
  }

  /** Zero buffers over a range; `owner`: the hold of the request they belong to. */
  private async writeZeroBuffers(
    offset: number,
    length: number,
    owner: RangeHold | undefined,
  ): Promise<void> {
    const chunk = Math.min(ZERO_CHUNK, this.maxTransfer);
    for (let pos = 0; pos < length; pos += chunk) {
      const n = Math.min(chunk, length - pos);
      const a = this.align;
      if (a > 1 && ((offset + pos) % a !== 0 || n % a !== 0)) {
        await this.writeUnaligned(offset + pos, zeros(n), owner);
      } else {
        // O_DIRECT needs arena memory: copy the zeros into a bounce buffer there.
        const buf = a > 1 ? this.allocBuffer(n) : undefined;
        try {
          const data = buf ? buf.subarray(0, n).fill(0) : zeros(n);
          if (this.tracker) await this.writeTracked(offset + pos, data, owner);
          else await this.writeAligned(offset + pos, data);
        } finally {
          if (buf) this.releaseBuffer(buf);
        }
      }
    }
  }

  /**
   * Discards a range where the node's `discard` option is 'unmap'; a no-op otherwise.
   * Serialised as a write is (see writeZeroes).
   */
  discard(offset: number, length: number): Promise<void> {
    const t0 = this.stats.start(ACCT_DISCARD);
    return this.stats.track(ACCT_DISCARD, t0, length, 0, this.discardRequest(offset, length));
  }

  private async discardRequest(offset: number, length: number): Promise<void> {
    const err = this.checkWrite(offset, length);
    if (err) throw err;
    if (length === 0 || this.settings.discard !== 'unmap') return;
    const t = this.tracker;
    const hold = t ? await t.write(offset, offset + length) : undefined;
    try {
      await this.discardRange(offset, length);
    } finally {
      if (hold) t!.release(hold);
    }
  }

  private async discardRange(offset: number, length: number): Promise<void> {
    const inst = this.instance;
    if (isProtocol(inst)) {
      if (!inst.discard) return;
      const a = this.align;
      const start = Math.ceil(offset / a) * a;
      const end = Math.floor((offset + length) / a) * a;
      if (end > start) await this.wrap(inst.discard(start, end - start));
    } else if (inst.kind === 'filter') {
      if (inst.intercept) await inst.intercept({ op: 'discard', offset, length });
      if (inst.discard) await inst.discard(offset, length);
      else await inst.child.node.discard(offset, length);
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
  flush(): Promise<void> {
    const t0 = this.stats.start(ACCT_FLUSH);
    return this.stats.track(ACCT_FLUSH, t0, 0, 0, this.flushRequest());
  }

  private async flushRequest(): Promise<void> {
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
}
