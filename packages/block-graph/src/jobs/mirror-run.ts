// The copying of a mirror (QEMU block/mirror.c mirror_run, mirror_iteration,
// do_sync_target_write): dirty ranges of the source's bitmap go to the target, up to
// buf-size bytes in flight; the job is ready when nothing is dirty or in flight, and at
// complete (or a cancel after ready) the last dirty ranges are copied with no request in
// flight (drained) before the pivot.
//
// An operation resets its range's bits before it reads the source, so that a guest write
// landing meanwhile marks them again (bits are set when a write is done: node-dirty.ts).
// Operations and the target writes of write-blocking mode hold their granules in one
// RangeLock, so that an older copy never lands on the target after a newer write; each
// takes the graph's read lock first, so that a drain never waits on it.
import type { BdrvDirtyBitmap } from '../dirty-bitmap.ts';
import type { ChildNode, CopySource } from '../driver.ts';
import type { BlockNode } from '../node.ts';
import { RangeLock } from '../range-lock.ts';
import type { BlockdevOnError, BlockJob } from './block-job.ts';
import type { MirrorTopWrites } from './mirror-top.ts';
import { resizeNode } from './resize.ts';

/** QEMU's MAX_IN_FLIGHT and MAX_IO_BYTES. */
const MAX_IN_FLIGHT = 16;
const MAX_IO_BYTES = 1 << 20;
/**
 * Operations that fill buf-size once copies below the buffers work: such a copy costs the
 * event loop one thread-pool call whatever its length and holds no memory of ours, so
 * buf-size goes in fewer, longer ones (4 MiB by default; the thread pool runs 4 at once).
 */
const COPY_IN_FLIGHT = 4;
/**
 * Data ranges up to this size are read and written, not copied below the buffers: the
 * engine does such small requests inline (pread/pwrite on the event loop, its INLINE_MAX),
 * which costs less than the thread-pool hop of a copy_file_range.
 */
const COPY_BELOW_MIN = 16 * 1024 + 1;
/** How long a ready job waits between looks at the bitmap (BLOCK_JOB_SLICE_TIME). */
const SLICE_MS = 100;

export interface MirrorRunOptions {
  source: BlockNode;
  target: BlockNode;
  bitmap: BdrvDirtyBitmap;
  /** Bytes in flight at most (buf-size). */
  bufSize: number;
  /** Which part of the source is dirty at the start. */
  sync: 'full' | 'top' | 'none';
  /** Layers of the source's chain that count as its data for sync (1: the top only). */
  depth: number;
  /** Zero the target first (sync full onto an existing image). */
  zeroTarget: boolean;
  /** Grow a smaller target to the source's size first (active commit). */
  growTarget: boolean;
  writeBlocking: boolean;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
}

export class MirrorRun implements MirrorTopWrites {
  readonly o: MirrorRunOptions;
  readonly bj: BlockJob;
  shouldComplete = false;
  ready = false;
  #ops = new RangeLock();
  #inFlight = 0;
  #bytesInFlight = 0;
  #opDone: (() => void)[] = [];
  #error: unknown;
  #initialZeroing = false;
  /** Copies below the buffers: still tried (see copyBelow), and one has been done. */
  readonly #below: CopyBelow = { tried: true, worked: false };
  #settleReady!: () => void;
  /** Resolves when the job is ready, or when its run ends. */
  readonly whenReady = new Promise<void>((resolve) => {
    this.#settleReady = resolve;
  });

  constructor(bj: BlockJob, o: MirrorRunOptions) {
    this.bj = bj;
    this.o = o;
  }

  get granularity(): number {
    return this.o.bitmap.granularity;
  }

  /** Copies actively (write-blocking) while the job has not failed or been cancelled. */
  get #copyToTarget(): boolean {
    return this.o.writeBlocking && this.#error === undefined && !this.bj.job.isCancelled;
  }

  async run(): Promise<void> {
    const { bj, o } = this;
    const job = bj.job;
    const size = o.source.size();
    if (o.growTarget && o.target.size() < size) {
      await bj.graph.lock.write(() => resizeNode(o.target, size));
    }
    await this.#dirtyInit(size);
    let pos = 0;
    try {
      for (;;) {
        if (job.isCancelled) break;
        if (this.#error !== undefined) throw this.#error;
        if (job.userPaused) {
          // QEMU's mirror_pause: the operations in flight end before the job pauses (an
          // error's stop included), so that a paused job's progress is all it did.
          while (this.#inFlight > 0) await this.#waitOp();
          await job.pausePoint();
          continue;
        }
        const cnt = o.bitmap.count();
        job.progressSetRemaining(this.#bytesInFlight + cnt);
        if (cnt > 0 && this.#inFlight < MAX_IN_FLIGHT && this.#bytesInFlight < o.bufSize) {
          // One iteration (mirror_iteration): a contiguous dirty area of up to buf-size,
          // in operations of up to max-io bytes, then the rate limit for all of it.
          let area = o.bitmap.nextDirtyArea(pos, size, o.bufSize);
          if (!area) area = o.bitmap.nextDirtyArea(0, size, o.bufSize);
          if (area) {
            pos = area.offset + area.length;
            o.bitmap.reset(area.offset, area.length);
            await bj.rateLimit(await this.#issueArea(area.offset, pos));
            continue;
          }
        }
        if (this.#inFlight > 0) {
          await this.#waitOp();
          continue;
        }
        if (cnt > 0) continue;
        if (!this.ready) {
          await bj.io(() => o.target.flush());
          bj.transitionToReady();
          this.ready = true;
          this.#settleReady();
        }
        if (this.shouldComplete || job.cancelRequested) return;
        await job.sleep(SLICE_MS);
      }
    } finally {
      while (this.#inFlight > 0) await this.#waitOp();
      this.#settleReady();
    }
  }

  /**
   * Issues [offset, end) in operations of up to max-io bytes; returns the bytes the rate
   * limit charges. As QEMU's mirror_iteration: where the target can write zeros by
   * unmapping, a range the source reads as zeros is one operation and costs nothing.
   */
  async #issueArea(offset: number, end: number): Promise<number> {
    const { o, bj } = this;
    const max = this.#maxIo();
    const zeroOk = canZeroWithUnmap(o.target);
    if (!zeroOk) {
      // The operations ask the source's status themselves, all at once: the first answer
      // is asked here before them, so that they find it in the file's data-region cache
      // rather than each walking a tmpfs file's page cache to its end (16 SEEK_HOLEs).
      await bj
        .io(() => o.source.blockStatus(offset, Math.min(max, end - offset), true))
        .catch(() => null);
    }
    let charged = 0;
    for (let off = offset; off < end; ) {
      let n = Math.min(max, end - off);
      let zero = false;
      if (zeroOk) {
        const s = await bj.io(() => o.source.blockStatus(off, end - off, true)).catch(() => null);
        if (s?.zero) {
          zero = true;
          n = s.length;
        } else if (s) n = Math.min(n, s.length);
      }
      // One operation at a time while users have requests (give-way.ts).
      const most = bj.usersActive ? 1 : MAX_IN_FLIGHT;
      while (this.#inFlight >= most) await this.#waitOp();
      this.#issue(off, n);
      if (!zero) charged += n;
      off += n;
    }
    return charged;
  }

  /**
   * The longest operation: buf-size / MAX_IN_FLIGHT (buf-size / COPY_IN_FLIGHT once copies
   * below the buffers work), at least 1 MiB and a granule.
   */
  #maxIo(): number {
    const g = this.granularity;
    const ops = this.#below.tried && this.#below.worked ? COPY_IN_FLIGHT : MAX_IN_FLIGHT;
    const max = Math.max(MAX_IO_BYTES, Math.floor(this.o.bufSize / ops));
    return Math.max(g, Math.min(this.o.bufSize, max - (max % g)));
  }

  /** The bitmap at the start (mirror_dirty_init). */
  async #dirtyInit(size: number): Promise<void> {
    const { o, bj } = this;
    if (o.sync === 'none') return;
    if (o.zeroTarget) {
      if (!canZeroWithUnmap(o.target)) {
        o.bitmap.set(0, size);
        return;
      }
      this.#initialZeroing = true;
      for (let off = 0; off < size; off += MAX_IO_BYTES * 64) {
        if (bj.job.isCancelled) return;
        const n = Math.min(MAX_IO_BYTES * 64, size - off);
        await bj.io(() => o.target.writeZeroes(off, n, { mayUnmap: true }));
        await bj.job.pausePoint();
      }
      this.#initialZeroing = false;
    }
    for (let off = 0; off < size; ) {
      if (bj.job.isCancelled) return;
      const s = await bj.io(() => o.source.blockStatus(off, size - off, false));
      if (s.depth >= 1 && s.depth <= o.depth) o.bitmap.set(off, s.length);
      off += s.length;
      await bj.job.pausePoint();
    }
  }

  #issue(offset: number, length: number): void {
    this.o.bitmap.reset(offset, length);
    this.#inFlight++;
    this.#bytesInFlight += length;
    void this.#copy(offset, length).finally(() => {
      this.#inFlight--;
      this.#bytesInFlight -= length;
      for (const w of this.#opDone.splice(0)) w();
    });
  }

  #waitOp(): Promise<void> {
    return new Promise((resolve) => this.#opDone.push(resolve));
  }

  /** One operation: [offset, +length) from the source to the target (mirror_co_read/zero). */
  async #copy(offset: number, length: number): Promise<void> {
    const { o, bj } = this;
    let reading = true;
    try {
      await bj.io(async () => {
        const hold = await this.#ops.serialise(offset, offset + length);
        try {
          await copyRange(o.source, o.target, offset, length, this.#below, (r) => {
            reading = r;
          });
        } finally {
          this.#ops.release(hold);
        }
      });
      if (!this.#initialZeroing) bj.job.progressUpdate(length);
    } catch (err) {
      o.bitmap.set(offset, length);
      const action = bj.errorAction(err, reading, reading ? o.onSourceError : o.onTargetError);
      if (action === 'report') this.#error ??= err;
    }
  }

  /** Write-blocking mode: the guest's write to the source, then to the target (active write). */
  async active(
    offset: number,
    length: number,
    source: () => Promise<void>,
    target: (node: ChildNode) => Promise<void>,
  ): Promise<void> {
    const g = this.granularity;
    const start = offset - (offset % g);
    const end = Math.ceil((offset + length) / g) * g;
    const hold = await this.#ops.serialise(start, end);
    try {
      await source();
      if (!this.#copyToTarget) return;
      const job = this.bj.job;
      job.progressIncreaseRemaining(length);
      try {
        await target(this.o.target);
        // Whole granules the write covered are clean now; partial ones stay dirty.
        const a = Math.ceil(offset / g) * g;
        const b = Math.floor((offset + length) / g) * g;
        if (b > a) this.o.bitmap.reset(a, b - a);
        job.progressUpdate(length);
      } catch (err) {
        this.o.bitmap.set(offset, length);
        const action = this.bj.errorAction(err, false, this.o.onTargetError);
        if (action === 'report') this.#error ??= err;
      }
    } finally {
      this.#ops.release(hold);
    }
  }

  /**
   * The last copy, with no request in flight (under the graph's write lock): whatever is
   * still dirty goes to the target, then the target is flushed.
   */
  async finalCopy(): Promise<void> {
    const { o } = this;
    for (;;) {
      const area = o.bitmap.nextDirtyArea(0, o.source.size(), this.#maxIo());
      if (!area) break;
      o.bitmap.reset(area.offset, area.length);
      await copyRange(o.source, o.target, area.offset, area.length, this.#below);
      this.bj.job.progressIncreaseRemaining(area.length);
      this.bj.job.progressUpdate(area.length);
    }
    await o.target.flush();
  }
}

/** Whether the mirror still tries copies below the buffers, and whether one was done. */
interface CopyBelow {
  tried: boolean;
  worked: boolean;
}

/**
 * Copies [offset, +length): data copied below the buffers where source and target can
 * (NodeCopy.copyFrom: the kernel's copy_file_range between their files), else read and
 * written; zeros written as zeros (may unmap). A copy below counts as written once it
 * starts: its errors go by on-target-error.
 */
async function copyRange(
  source: BlockNode,
  target: BlockNode,
  offset: number,
  length: number,
  below: CopyBelow,
  /** Told false once the source is read (errors then are the target's), true again if not. */
  reading?: (r: boolean) => void,
): Promise<void> {
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const s = await source.blockStatus(pos, end - pos, true);
    let n = s.length;
    if (s.zero) {
      reading?.(false);
      await target.writeZeroes(pos, n, { mayUnmap: true });
    } else {
      let copied = 0;
      if (n >= COPY_BELOW_MIN && below.tried) {
        // Asked without a wait where the source's mapping is cached: a range that is in no
        // file (backing data, compressed) is read as soon as it would have been.
        let src = source.dataIn(pos, n);
        if (src instanceof Promise) src = await src;
        if (src && src.length >= COPY_BELOW_MIN) {
          copied = await copyBelow(target, pos, src, below, reading);
        }
      }
      if (copied > 0) n = copied;
      else {
        const buf = source.allocBuffer(n);
        try {
          const data = buf.subarray(0, n);
          await source.read(pos, data);
          reading?.(false);
          await target.write(pos, data);
        } finally {
          source.releaseBuffer(buf);
        }
      }
    }
    pos += n;
  }
}

/**
 * Copies `src` (source's data from `offset`, where it lies in one file) to target below
 * the buffers: the bytes copied, 0 when not. Once the target refuses (a filter,
 * detect-zeroes, files on two file systems) operations that start later do not ask
 * again: each refusal of a qcow2 target takes clusters and gives them back. Source data
 * that is in no file (compressed) concerns its range only (dataIn says so first).
 */
async function copyBelow(
  target: BlockNode,
  offset: number,
  src: CopySource,
  below: CopyBelow,
  reading?: (r: boolean) => void,
): Promise<number> {
  reading?.(false);
  if (await target.copyFrom(offset, src.length, src)) {
    below.worked = true;
    return src.length;
  }
  below.tried = false;
  reading?.(true);
  return 0;
}

/** QEMU bdrv_can_write_zeroes_with_unmap: discard=unmap on a node that can unmap zeros. */
function canZeroWithUnmap(node: BlockNode): boolean {
  return node.settings.discard === 'unmap' && !node.readOnly;
}
