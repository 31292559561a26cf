// The copying of a backup job (QEMU block/backup.c backup_run, backup_loop over
// block-copy): what the copy-before-write filter still has to copy goes to the target, in
// areas of up to 1 MiB with up to MAX_WORKERS in flight, at `speed`. Guest writes meanwhile
// copy their clusters first through the same filter state, so the target gets the disk as
// it was when the job started. And the sync bitmap's fate at the end (bitmap-mode).
import type { BdrvDirtyBitmap } from '../dirty-bitmap.ts';
import { type CopyBeforeWriteInstance, isTargetError } from '../drivers/copy-before-write.ts';
import type { BlockNode } from '../node.ts';
import type { BlockdevOnError, BlockJob } from './block-job.ts';

/** Copies in flight at most (QEMU's default x-perf max-workers is 64; 16 does here). */
const MAX_WORKERS = 16;
/** The largest area one copy takes (QEMU's BLOCK_COPY_MAX_BUFFER). */
const MAX_CHUNK = 1 << 20;

export type BackupSyncMode = 'full' | 'top' | 'none' | 'bitmap';
export type BitmapSyncMode = 'on-success' | 'always' | 'never';

export interface BackupRunOptions {
  source: BlockNode;
  target: BlockNode;
  cbw: CopyBeforeWriteInstance;
  sync: BackupSyncMode;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
}

/**
 * The user's bitmap a backup reads (sync=bitmap) or resets (bitmap-mode): frozen for the
 * job's life (busy, not recording) while a successor records the writes made meanwhile
 * (QEMU bdrv_dirty_bitmap_create_successor).
 */
export class SyncBitmap {
  readonly bitmap: BdrvDirtyBitmap;
  readonly mode: BitmapSyncMode;
  readonly #node: BlockNode;
  readonly #successor: BdrvDirtyBitmap;
  readonly #recording: boolean;

  /** Freezes `bitmap` of `node`; call where no write is in flight (drained). */
  constructor(node: BlockNode, bitmap: BdrvDirtyBitmap, mode: BitmapSyncMode) {
    this.#node = node;
    this.bitmap = bitmap;
    this.mode = mode;
    this.#recording = bitmap.enabled;
    this.#successor = node.createDirtyBitmap(bitmap.granularity);
    this.#successor.enabled = bitmap.enabled;
    bitmap.enabled = false;
    bitmap.busy = true;
  }

  /**
   * The job ended (QEMU backup_cleanup_sync_bitmap): on success, or always, the bitmap
   * becomes what was written since the start (abdicate); otherwise, or never, it keeps its
   * bits plus those (reclaim). `uncopied`: what a failed job did not copy, which `always`
   * keeps dirty.
   */
  finish(ok: boolean, uncopied: BdrvDirtyBitmap | undefined): void {
    const sync = (ok || this.mode === 'always') && this.mode !== 'never';
    if (sync) this.bitmap.clear();
    this.bitmap.merge(this.#successor);
    if (!ok && this.mode === 'always' && uncopied) this.bitmap.merge(uncopied);
    this.#node.releaseDirtyBitmap(this.#successor);
    this.bitmap.enabled = this.#recording;
    this.bitmap.busy = false;
  }
}

export class BackupRun {
  readonly o: BackupRunOptions;
  readonly bj: BlockJob;

  constructor(bj: BlockJob, o: BackupRunOptions) {
    this.bj = bj;
    this.o = o;
  }

  async run(syncBitmap: SyncBitmap | undefined): Promise<void> {
    const { bj, o } = this;
    const job = bj.job;
    const cbw = o.cbw;
    cbw.onCopied = (n) => job.progressUpdate(n);
    // backup_init_bcs_bitmap: sync=bitmap copies the bitmap's clusters only.
    if (o.sync === 'bitmap' && syncBitmap) {
      cbw.copyBitmap.clear();
      cbw.copyBitmap.merge(syncBitmap.bitmap);
    }
    job.progressSetRemaining(cbw.copyBitmap.count());
    if (o.sync === 'top') {
      cbw.copy.skipUnallocated = true;
      await this.#resetUnallocated();
      cbw.copy.skipUnallocated = false;
      if (job.isCancelled) return;
    }
    if (o.sync === 'none') {
      // Only the guest's writes copy (through the filter), until the job is cancelled.
      while (!job.isCancelled) await job.yield();
      return;
    }
    await this.#loop();
    if (!job.isCancelled) await bj.io(() => o.target.flush());
  }

  /** sync=top: clusters the top layer does not hold are not copied (block_copy_reset_unallocated). */
  async #resetUnallocated(): Promise<void> {
    const { bj, o } = this;
    const size = o.source.size();
    const c = o.cbw.clusterSize;
    for (let off = 0; off < size; ) {
      if (bj.job.isCancelled) return;
      const s = await bj.io(() => o.source.blockStatus(off, size - off, false));
      if (s.depth !== 1) {
        // Only whole clusters: a partly allocated one is copied.
        const a = Math.ceil(off / c) * c;
        const end = off + s.length;
        const b = end === size ? end : end - (end % c);
        if (b > a) o.cbw.copyBitmap.reset(a, b - a);
      }
      off += s.length;
      bj.job.progressSetRemaining(o.cbw.copyBitmap.count());
      await bj.job.pausePoint();
    }
  }

  /** backup_loop: copies until nothing is left, by the on-error policies. */
  async #loop(): Promise<void> {
    const { bj, o } = this;
    const job = bj.job;
    for (;;) {
      const failure = await this.#pass();
      if (job.isCancelled || failure === undefined) return;
      const policy = failure.read ? o.onSourceError : o.onTargetError;
      const action = bj.errorAction(failure.err, failure.read, policy);
      if (action === 'report') throw failure.err;
      // stop: paused until resumed, then a new pass; ignore: a new pass (as QEMU, a retry).
      if (action === 'stop') await bj.afterStop();
      else await job.pausePoint();
    }
  }

  /** One pass over what is still to copy; the first failure, if any. */
  async #pass(): Promise<{ err: unknown; read: boolean } | undefined> {
    const { bj, o } = this;
    const job = bj.job;
    const cbw = o.cbw;
    const size = o.source.size();
    const chunk = cbw.copy.compress ? cbw.clusterSize : MAX_CHUNK;
    let failure: { err: unknown; read: boolean } | undefined;
    // Copies in flight, and who waits for one to end (a count and one waker: a race over
    // the set of copies would allocate per copy).
    let inFlight = 0;
    let wake: (() => void) | undefined;
    const copy = async (offset: number, length: number): Promise<void> => {
      try {
        await bj.io(() => cbw.copyRange(offset, length));
      } catch (err) {
        failure ??= { err, read: !isTargetError(err) };
      } finally {
        inFlight--;
        const w = wake;
        wake = undefined;
        w?.();
      }
    };
    const slot = (below: number): Promise<void> | undefined =>
      inFlight < below
        ? undefined
        : new Promise<void>((resolve) => {
            wake = resolve;
          });
    let pos = 0;
    while (failure === undefined && !job.isCancelled) {
      const area = cbw.copyBitmap.nextDirtyArea(pos, size, chunk);
      if (!area) break;
      pos = area.offset + area.length;
      inFlight++;
      void copy(area.offset, area.length);
      // Wait for a free worker; the loop is the only waiter.
      for (let w = slot(MAX_WORKERS); w; w = slot(MAX_WORKERS)) await w;
      // Unlimited and no user to give way to: a pause point only (a zero-length sleep per
      // area costs a timer each).
      if (job.speed > 0 || bj.usersActive) await bj.rateLimit(area.length);
      else await job.pausePoint();
    }
    for (let w = slot(1); w; w = slot(1)) await w;
    return failure;
  }
}
