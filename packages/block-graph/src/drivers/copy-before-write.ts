// The `copy-before-write` filter (QEMU 7.2 block/copy-before-write.c over block-copy.c):
// before a write, write-zeroes or discard reaches a range of `file` whose old data has not
// been copied yet, the old data goes to `target` first. The filter keeps three bitmaps of
// one bit per cluster: what is still to copy (all of the disk, or the clusters of the
// `bitmap` option), what was copied (read from the target from then on) and what the
// point-in-time may still be read from (snapshot-access, snapshot-access.ts). Reads go to
// `file`. A backup job (jobs/backup.ts) inserts one above its source and copies the rest
// through the same state, so that the guest and the job never copy a cluster twice.
//
// One RangeLock over clusters serialises copies, and point-in-time reads from `file`
// against the copies guest writes make (QEMU's block-copy tasks and frozen_read_reqs): a
// guest write waits until a point-in-time read of its range from `file` is done.
import { BdrvDirtyBitmap } from '../dirty-bitmap.ts';
import type {
  BdrvChild,
  BlockDriver,
  ChildNode,
  FilterInstance,
  ProtocolStatus,
  ZeroFlags,
} from '../driver.ts';
import { BlockError, BlockErrorCode, BlockIoError, BlockOptionError } from '../errors.ts';
import {
  BLK_PERM_ALL,
  BLK_PERM_CONSISTENT_READ,
  BLK_PERM_RESIZE,
  BLK_PERM_WRITE,
  defaultChildPerms,
} from '../permissions.ts';
import { type RangeHold, RangeLock } from '../range-lock.ts';
import { enumOf, opt, str, struct, uint32 } from '../schema.ts';

/** QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT. */
export const CBW_CLUSTER_SIZE = 64 << 10;
/** The largest read or write of one copy (QEMU's BLOCK_COPY_MAX_BUFFER). */
const MAX_BUFFER = 1 << 20;

export type OnCbwError = 'break-guest-write' | 'break-snapshot';

/** What the copy does besides the filter's own defaults (a backup job sets these). */
export interface CopyOptions {
  /** Skip ranges not allocated in the top layer of `file` (backup sync=top, at the start). */
  skipUnallocated?: boolean;
  /** Write the target's clusters compressed (backup compress=true). */
  compress?: (offset: number, buf: Uint8Array) => Promise<void>;
}

/** Errors of a copy's writes to the target (the rest are reads of the source). */
const targetErrors = new WeakSet<object>();

/** Whether a copy failed writing the target rather than reading the source. */
export function isTargetError(err: unknown): boolean {
  return typeof err === 'object' && err !== null && targetErrors.has(err);
}

/** Marks an error of the target's side; returns it (to throw). */
function targetError(err: unknown): unknown {
  if (typeof err === 'object' && err !== null) targetErrors.add(err);
  return err;
}

/** The instances by their `file` edge, so that snapshot-access finds the one it reads. */
const byFileEdge = new WeakMap<BdrvChild, CopyBeforeWriteInstance>();

/** The copy-before-write state of a node, or undefined when it is no copy-before-write node. */
export function copyBeforeWriteOf(node: ChildNode): CopyBeforeWriteInstance | undefined {
  const edge = node.driver === 'copy-before-write' ? node.primary : undefined;
  return edge && byFileEdge.get(edge);
}

export class CopyBeforeWriteInstance implements FilterInstance {
  readonly kind = 'filter';
  readonly child: BdrvChild;
  readonly target: BdrvChild;
  /** The target's cluster size, at least 64 KiB (block_copy_calculate_cluster_size). */
  readonly clusterSize: number;
  /** Clusters whose old data still has to be copied (block-copy's copy_bitmap). */
  readonly copyBitmap: BdrvDirtyBitmap;
  /** Clusters copied: the point-in-time reads them from the target. */
  readonly doneBitmap: BdrvDirtyBitmap;
  /** Clusters the point-in-time may be read from (QEMU's access_bitmap). */
  readonly accessBitmap: BdrvDirtyBitmap;
  readonly onCbwError: OnCbwError;
  /** cbw-timeout in milliseconds (0: none). */
  readonly timeoutMs: number;
  copy: CopyOptions = {};
  /** Called with the bytes of each copied range (a backup job's progress). */
  onCopied: ((bytes: number) => void) | undefined;
  /** Set when a copy failed under break-snapshot: the point-in-time is gone. */
  snapshotError: unknown;
  readonly #lock = new RangeLock();

  constructor(
    file: BdrvChild,
    target: BdrvChild,
    o: { onCbwError: OnCbwError; timeoutMs: number; bitmap: BdrvDirtyBitmap | undefined },
  ) {
    this.child = file;
    this.target = target;
    this.onCbwError = o.onCbwError;
    this.timeoutMs = o.timeoutMs;
    const size = file.node.size();
    // Copying less than a target cluster would make the target copy on write from its
    // backing (or, without one, leave the rest of the cluster unwritten).
    this.clusterSize = Math.max(CBW_CLUSTER_SIZE, target.node.clusterSize() ?? 0);
    this.copyBitmap = new BdrvDirtyBitmap(size, this.clusterSize);
    if (o.bitmap) this.copyBitmap.merge(o.bitmap);
    else this.copyBitmap.set(0, size);
    this.doneBitmap = new BdrvDirtyBitmap(size, this.clusterSize);
    this.accessBitmap = new BdrvDirtyBitmap(size, this.clusterSize);
    this.accessBitmap.merge(this.copyBitmap);
    byFileEdge.set(file, this);
  }

  size(): number {
    return this.child.node.size();
  }

  async write(offset: number, buf: Uint8Array): Promise<void> {
    await this.#beforeWrite(offset, buf.byteLength);
    return this.child.node.write(offset, buf);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.#beforeWrite(offset, length);
    return this.child.node.writeZeroes(offset, length, flags);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.#beforeWrite(offset, length);
    return this.child.node.discard(offset, length);
  }

  #align(offset: number, length: number): [number, number] {
    const c = this.clusterSize;
    const start = offset - (offset % c);
    return [start, Math.min(this.size(), Math.ceil((offset + length) / c) * c)];
  }

  /** QEMU cbw_do_copy_before_write: copies the clusters the write touches, if not done yet. */
  async #beforeWrite(offset: number, length: number): Promise<void> {
    if (this.snapshotError !== undefined) return;
    const [start, end] = this.#align(offset, length);
    if (this.copyBitmap.nextDirty(start, end) < 0) return;
    try {
      await this.#withTimeout(this.copyRange(start, end - start));
    } catch (err) {
      if (this.onCbwError === 'break-guest-write') throw err;
      this.snapshotError = err;
    }
  }

  #withTimeout(p: Promise<void>): Promise<void> {
    if (this.timeoutMs === 0) return p;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(
          new BlockIoError('copy-before-write timed out', {
            errnoName: 'ETIMEDOUT',
            syscall: 'copy-before-write',
          }),
        );
      }, this.timeoutMs);
    });
    // A copy that goes on after the timeout still lands; its failure is not anyone's.
    p.catch(() => {});
    return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
  }

  /**
   * Copies the clusters of [offset, +length) still to copy (cluster aligned) from `file`
   * to the target (QEMU block_copy): zeros as write-zeroes, data read and written.
   */
  async copyRange(offset: number, length: number): Promise<void> {
    const end = offset + length;
    // Most copies overlap nothing: no wait (a promise and a turn per cluster otherwise).
    const hold = this.#lock.trySerialise(offset, end) ?? (await this.#lock.serialise(offset, end));
    try {
      // Only this copy resets bits of [offset, end) while it holds the range.
      for (let pos = offset; ; ) {
        const area = this.copyBitmap.nextDirtyArea(pos, end);
        if (!area) break;
        pos = area.offset + area.length;
        await this.#copyArea(area.offset, pos);
      }
    } finally {
      this.#lock.release(hold);
    }
  }

  async #copyArea(start: number, end: number): Promise<void> {
    const source = this.child.node;
    const target = this.target.node;
    let pos = start;
    while (pos < end) {
      // Allocation and the format's zeros suffice (asking the file too costs far more).
      const s = await source.blockStatus(pos, end - pos, false);
      // Whole clusters: a shorter answer copies one cluster as data (block_copy_block_status).
      let n = Math.min(end - pos, Math.max(s.length, this.clusterSize));
      if (n < end - pos) n -= n % this.clusterSize;
      const asData = s.length < this.clusterSize;
      if (this.copy.skipUnallocated && !asData && s.depth !== 1) {
        this.copyBitmap.reset(pos, n);
      } else if (s.zero && !asData) {
        try {
          await target.writeZeroes(pos, n);
        } catch (err) {
          throw targetError(err);
        }
        this.#done(pos, n);
      } else {
        // The data, read and written in pieces of at most one buffer (here rather than in
        // a function of its own: one async frame less per cluster copied).
        const compress = this.copy.compress;
        const unit = compress ? this.clusterSize : MAX_BUFFER;
        const buf = source.allocBuffer(Math.min(n, unit));
        try {
          for (let off = pos; off < pos + n; off += unit) {
            const len = Math.min(unit, pos + n - off);
            const data = len === buf.byteLength ? buf : buf.subarray(0, len);
            await source.read(off, data);
            try {
              await (compress ? compress(off, data) : target.write(off, data));
            } catch (err) {
              throw targetError(err);
            }
            this.#done(off, len);
          }
        } finally {
          source.releaseBuffer(buf);
        }
      }
      pos += n;
    }
  }

  #done(offset: number, length: number): void {
    this.copyBitmap.reset(offset, length);
    this.doneBitmap.set(offset, length);
    this.onCopied?.(length);
  }

  /**
   * Where the point-in-time of [offset, +length) is read from now (QEMU
   * cbw_snapshot_read_lock): the target for copied clusters, `file` (held against copies
   * until `release`) for the others; EACCES when it cannot be read any more.
   */
  async #snapshotLock(
    offset: number,
    length: number,
  ): Promise<{ node: ChildNode; length: number; hold?: RangeHold }> {
    const [start, end] = this.#align(offset, length);
    const hold = await this.#lock.serialise(start, end);
    let keep = false;
    try {
      if (this.snapshotError !== undefined || this.accessBitmap.nextZero(start, end) >= 0) {
        throw new BlockIoError('Permission denied', {
          errnoName: 'EACCES',
          syscall: 'snapshot-access',
          offset,
          length,
        });
      }
      const done = this.doneBitmap.get(offset);
      const change = done
        ? this.doneBitmap.nextZero(offset, end)
        : this.doneBitmap.nextDirty(offset, end);
      const n = Math.min(offset + length, change < 0 ? end : change) - offset;
      if (done) return { node: this.target.node, length: n };
      keep = true;
      return { node: this.child.node, length: n, hold };
    } finally {
      if (!keep) this.#lock.release(hold);
    }
  }

  /** Reads the point-in-time (snapshot-access's read; QEMU cbw_co_preadv_snapshot). */
  async snapshotRead(offset: number, buf: Uint8Array): Promise<void> {
    let pos = 0;
    while (pos < buf.byteLength) {
      const at = await this.#snapshotLock(offset + pos, buf.byteLength - pos);
      try {
        await at.node.read(offset + pos, buf.subarray(pos, pos + at.length));
      } finally {
        if (at.hold) this.#lock.release(at.hold);
      }
      pos += at.length;
    }
  }

  /** Block status of the point-in-time from offset (QEMU cbw_co_snapshot_block_status). */
  async snapshotBlockStatus(offset: number, length: number): Promise<ProtocolStatus> {
    const at = await this.#snapshotLock(offset, length);
    try {
      const s = await at.node.blockStatus(offset, at.length, true);
      return { length: s.length, hole: s.hole && !s.zero, zero: s.zero };
    } finally {
      if (at.hold) this.#lock.release(at.hold);
    }
  }

  info(): Record<string, unknown> {
    return {};
  }
}

export const copyBeforeWriteDriver: BlockDriver = {
  name: 'copy-before-write',
  options: {
    /** A bitmap of a node: only its dirty clusters are copied (and readable). */
    bitmap: opt(struct({ node: str, name: str }, 'BlockDirtyBitmap')),
    'on-cbw-error': opt(enumOf(['break-guest-write', 'break-snapshot'])),
    'cbw-timeout': opt(uint32),
  },
  children: [
    { key: 'file', required: true, roles: () => ['filtered', 'primary'] },
    { key: 'target', required: true, roles: () => ['data'] },
  ],
  childPerms(roles, perm, shared, writable) {
    if (!roles.includes('filtered')) {
      // The target (cbw_child_perm): written; its backing chain may be the guest's disk.
      return { perm: BLK_PERM_WRITE, shared: BLK_PERM_ALL & ~BLK_PERM_RESIZE };
    }
    const p = defaultChildPerms(roles, perm, shared, writable);
    // Without parents yet (being inserted above the source), nothing more: QEMU's test
    // of bs->parents, as far as permissions show it.
    if (perm === 0 && shared === BLK_PERM_ALL) return p;
    // Nobody writes the source behind the filter's back; the copy reads it consistently.
    return {
      perm: perm & BLK_PERM_WRITE ? p.perm | BLK_PERM_CONSISTENT_READ : p.perm,
      shared: p.shared & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE),
    };
  },
  async open(ctx) {
    const file = ctx.children.file!;
    const target = ctx.children.target!;
    const o = ctx.options as {
      bitmap?: { node: string; name: string };
      'on-cbw-error'?: OnCbwError;
      'cbw-timeout'?: number;
    };
    let bitmap: BdrvDirtyBitmap | undefined;
    if (o.bitmap) {
      // The bitmap's node is the filtered one (QEMU allows any node of the same size).
      const found =
        o.bitmap.node === file.node.name ? file.node.findDirtyBitmap(o.bitmap.name) : undefined;
      if (!found) {
        throw new BlockOptionError('bitmap', '', `Dirty bitmap '${o.bitmap.name}' not found`);
      }
      bitmap = found;
    }
    if (target.node.size() < file.node.size()) {
      throw new BlockError(
        BlockErrorCode.BAD_OPTION,
        'Source and target image have different sizes',
      );
    }
    return new CopyBeforeWriteInstance(file, target, {
      onCbwError: o['on-cbw-error'] ?? 'break-guest-write',
      timeoutMs: (o['cbw-timeout'] ?? 0) * 1000,
      bitmap,
    });
  },
};
