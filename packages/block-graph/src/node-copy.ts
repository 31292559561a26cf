// Copies below the buffers (QEMU's bdrv_co_copy_range): where a node's data lives in a
// protocol (dataIn), and a write of such bytes to another node that its drivers pass down
// to their protocol, which copies from the other one without a buffer (copyFrom: the file
// driver's copy_file_range). The write takes the same path as write() down to the
// protocol: checks, serialisation of overlapping writes, the format's allocation and its
// commit, accounting, and (NodeDirty) the dirty bitmaps. Where any layer cannot (a
// filter, a copy on write, an unaligned range, detect-zeroes, protocols that cannot copy
// between them) the copy answers false, having taken nothing (a mapping's allocation is
// given back), and the caller reads and writes the range instead.

import type { CopySource, Mapping } from './driver.ts';
import { isProtocol, mappedInChild } from './io-request.ts';
import { ACCT_WRITE } from './node-stats.ts';
import { NodeWrite } from './node-write.ts';

export abstract class NodeCopy extends NodeWrite {
  /**
   * Where [offset, +length) of this node lives in a protocol, from offset on (a format's
   * data mapping, or the protocol node itself): undefined where it is no place in a
   * protocol (zeros, unallocated, compressed, a filter). Reads nothing. Synchronous where
   * the format's mapping is (cached metadata): a caller that reads and writes instead
   * when the answer is no then starts as soon as it would have without asking.
   */
  dataIn(offset: number, length: number): CopySource | undefined | Promise<CopySource | undefined> {
    const inst = this.instance;
    if (offset < 0 || length <= 0 || offset + length > inst.size()) return undefined;
    if (isProtocol(inst)) return { protocol: inst, offset, length };
    if (inst.kind !== 'format') return undefined;
    const m = inst.map(offset, length, 'read');
    return m instanceof Promise
      ? m.then((r) => this.#inProtocol(r, length))
      : this.#inProtocol(m, length);
  }

  /** A format's read mapping as a place in its protocol child (see dataIn). */
  #inProtocol(m: Mapping, length: number): CopySource | undefined {
    const at = mappedInChild(m, length);
    if (!(at?.node instanceof NodeCopy)) return undefined;
    const below = at.node.instance;
    if (!isProtocol(below)) return undefined;
    return { protocol: below, offset: at.offset, length: at.length };
  }

  /**
   * Writes `length` bytes of `src` at `offset`, copied below without a buffer; false where
   * this node's drivers cannot (see the top of this file): then the caller writes the
   * range, part of which may have been copied already. Errors as write()'s.
   */
  copyFrom(offset: number, length: number, src: CopySource): Promise<boolean> {
    const t0 = this.stats.start(ACCT_WRITE);
    return this.copyRequest(offset, length, src).then(
      (done) => {
        if (done) this.stats.done(ACCT_WRITE, t0, length);
        else this.stats.forget(ACCT_WRITE);
        if (done && offset + length > this.stats.wrHighestOffset) {
          this.stats.wrHighestOffset = offset + length;
        }
        return done;
      },
      (err: unknown) => {
        this.stats.fail(ACCT_WRITE, t0, err);
        throw err;
      },
    );
  }

  private async copyRequest(offset: number, length: number, src: CopySource): Promise<boolean> {
    const err = this.checkWrite(offset, length, true);
    if (err) throw err;
    if (length === 0) return true;
    // detect-zeroes looks at the data, which a copy below never sees.
    if (length > src.length || this.settings.detectZeroes !== 'off') return false;
    const a = this.align;
    if (a > 1 && (offset % a !== 0 || length % a !== 0)) return false;
    const t = this.tracker;
    const hold = t ? await t.write(offset, offset + length) : undefined;
    try {
      return await this.copyAligned(offset, length, src);
    } finally {
      if (hold) t!.release(hold);
    }
  }

  private async copyAligned(offset: number, length: number, src: CopySource): Promise<boolean> {
    const inst = this.instance;
    if (isProtocol(inst)) {
      if (!inst.copyFrom || length > this.maxTransfer) return false;
      return this.wrap(inst.copyFrom(src.protocol, src.offset, offset, length));
    }
    if (inst.kind !== 'format') return false;
    // Mapping by mapping (a qcow2 allocation takes at most 32 clusters, a table's span).
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      let m: Mapping | Promise<Mapping> = inst.map(pos, end - pos, 'write');
      if (m instanceof Promise) m = await m;
      if (!(await this.copyMapped(m, pos, { ...src, offset: src.offset + (pos - offset) }))) {
        return false;
      }
      pos += m.length;
    }
    return true;
  }

  /** One mapping's copy to its child, then its commit; false (given back): not done. */
  private async copyMapped(m: Mapping, pos: number, src: CopySource): Promise<boolean> {
    const alloc = m.allocation;
    const child = m.child?.node;
    // An allocation the copy fills whole (no copy on write).
    const copyable =
      m.kind === 'data' &&
      m.offset !== undefined &&
      child?.copyFrom !== undefined &&
      (!alloc || (alloc.start === pos && alloc.end === pos + m.length));
    let done = false;
    try {
      if (copyable) done = await child.copyFrom!(m.offset!, m.length, src);
    } catch (err) {
      if (alloc?.abort) await alloc.abort(err);
      throw err;
    }
    // Not copied: what the mapping took (qcow2: fresh clusters, locks) goes back, as after
    // a failed write.
    if (!done) {
      if (alloc?.abort) await alloc.abort(undefined);
      return false;
    }
    if (alloc) await alloc.commit();
    return true;
  }
}
