// blockdev-backup and drive-backup (QEMU 7.2 blockdev.c do_backup_common,
// drive_backup_prepare; block/backup.c backup_job_create). The job's point-in-time is its
// start: in one drained change a copy-before-write filter goes above the source (every
// parent of the source moves onto it) and the sync bitmap, if any, is frozen, so a guest
// write after that copies the old data to the target first. The job copies the rest
// (backup-run.ts) and takes the filter out at the end.
import { readFileSync } from 'node:fs';
import type { JobRegistry, JobTxn } from '@vmdisk/ao';
import { BITMAP_ALLOW_RO, BITMAP_DEFAULT, checkDirtyBitmap } from '../dirty-bitmap-check.ts';
import type { FormatInstance } from '../driver.ts';
import {
  type CopyBeforeWriteInstance,
  copyBeforeWriteDriver,
} from '../drivers/copy-before-write.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import type { PreparedAction } from '../transaction.ts';
import { BackupRun, type BackupSyncMode, type BitmapSyncMode, SyncBitmap } from './backup-run.ts';
import { type BlockdevOnError, BlockJob, type BlockJobCommonOptions } from './block-job.ts';
import { checkNotBusy } from './op-blockers.ts';
import { lookupNode } from './resize.ts';
import { createImage } from './snapshot.ts';

const ALL = ['consistent-read', 'write', 'write-unchanged', 'resize'] as const;

export interface BackupCommonOptions extends BlockJobCommonOptions {
  device: string;
  sync: BackupSyncMode | 'incremental';
  bitmap?: string;
  bitmapMode?: BitmapSyncMode;
  compress?: boolean;
  onSourceError?: BlockdevOnError;
  onTargetError?: BlockdevOnError;
  filterNodeName?: string;
}

export interface BlockdevBackupOptions extends BackupCommonOptions {
  /** The target node. */
  target: string;
}

export interface DriveBackupOptions extends BackupCommonOptions {
  /** The target image's file name. */
  target: string;
  format?: string;
  /** 'absolute-paths' (default): create the image; 'existing': open it. */
  mode?: 'existing' | 'absolute-paths';
}

function bad(message: string): BlockError {
  return new BlockError(BlockErrorCode.BAD_JOB, message);
}

/** do_backup_common's checks of sync, bitmap and bitmap-mode, in QEMU's order. */
function checkSync(
  source: BlockNode,
  o: BackupCommonOptions,
): { sync: BackupSyncMode; bitmapMode?: BitmapSyncMode } {
  let sync = o.sync;
  let mode = o.bitmapMode;
  if ((sync === 'bitmap' || sync === 'incremental') && o.bitmap === undefined) {
    throw bad(`must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (mode !== undefined && mode !== 'on-success') {
      throw bad("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    }
    sync = 'bitmap';
    mode = 'on-success';
  }
  if (o.bitmap !== undefined) {
    const bm = source.findDirtyBitmap(o.bitmap);
    if (!bm) throw bad(`Bitmap '${o.bitmap}' could not be found`);
    if (mode === undefined) throw bad('Bitmap sync mode must be given when providing a bitmap');
    checkDirtyBitmap(bm, BITMAP_ALLOW_RO);
    if (sync === 'none') {
      throw bad("sync mode 'none' does not produce meaningful bitmap outputs");
    }
    if (mode === 'never' && sync !== 'bitmap') {
      throw bad(
        `Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`,
      );
    }
  } else if (mode !== undefined) {
    throw bad('Cannot specify bitmap sync mode without a bitmap');
  }
  return { sync, ...(mode !== undefined && { bitmapMode: mode }) };
}

/** blockdev-backup: to an existing node. */
export async function blockdevBackup(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: BlockdevBackupOptions,
): Promise<BlockJob> {
  const prepared = await blockdevBackupPrepare(graph, jobs, o);
  await runPrepared(prepared);
  return prepared.bj;
}

/** blockdev-backup's job, created (not started), in `txn` if given (a transaction's action). */
export async function blockdevBackupPrepare(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: BlockdevBackupOptions,
  txn?: JobTxn,
): Promise<BackupAction> {
  const source = lookupNode(graph, o.device, o.device) as BlockNode;
  const target = lookupNode(graph, o.target, o.target) as BlockNode;
  return backupPrepare(graph, jobs, source, target, o, txn);
}

/** A backup job created and not yet started: commit starts it, abort cancels it. */
export interface BackupAction extends PreparedAction {
  readonly bj: BlockJob;
  commit(): Promise<void>;
  abort(): Promise<void>;
  clean(): void;
}

/** The command outside a transaction: the action prepared, then committed at once. */
async function runPrepared(a: BackupAction): Promise<void> {
  await a.commit();
  await a.clean();
}

/** The format of an existing image (QEMU probes it): qcow2 by its magic, raw otherwise. */
function probeFormat(filename: string): string {
  try {
    const head = readFileSync(filename).subarray(0, 4);
    return head.length === 4 && head.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  } catch {
    return 'raw';
  }
}

/** drive-backup: to an image file, created (absolute-paths) or opened (existing). */
export async function driveBackup(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: DriveBackupOptions,
): Promise<BlockJob> {
  const prepared = await driveBackupPrepare(graph, jobs, o);
  await runPrepared(prepared);
  return prepared.bj;
}

/** drive-backup's target made and its job created (not started), in `txn` if given. */
export async function driveBackupPrepare(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: DriveBackupOptions,
  txn?: JobTxn,
): Promise<BackupAction> {
  const source = lookupNode(graph, o.device, o.device) as BlockNode;
  const mode = o.mode ?? 'absolute-paths';
  const format = o.format ?? (mode === 'existing' ? probeFormat(o.target) : source.driver);
  if (format !== 'qcow2' && format !== 'raw') {
    throw new BlockError(
      BlockErrorCode.NOT_SUPPORTED,
      `drive-backup does not support format '${format}' (qcow2, raw)`,
    );
  }
  checkNotBusy(graph, source.name);
  let sync = o.sync;
  // The target's backing: the source's (top; none: full), the source (none).
  let backing: BlockNode | undefined;
  if (sync === 'top') {
    backing = cowBelow(source);
    if (!backing) sync = 'full';
  }
  if (sync === 'none') backing = source;
  if (mode === 'absolute-paths') {
    await createImage(graph, o.target, format, source.size(), backing);
  }
  const target = (await graph.add({
    driver: format,
    discard: 'unmap',
    'detect-zeroes': 'unmap',
    file: { driver: 'file', filename: o.target },
    ...(format === 'qcow2' && { backing: null }),
  })) as BlockNode;
  try {
    if (backing && format === 'qcow2') await graph.setBacking(target.name, backing.name);
    const prepared = await backupPrepare(graph, jobs, source, target, { ...o, sync }, txn);
    // The target goes once the job has let go of it (ended, or cancelled by abort).
    const drop = async (): Promise<void> => {
      await graph.del(target.name).catch(() => {});
    };
    void prepared.bj.job.wait().then(drop, drop);
    return prepared;
  } catch (err) {
    await graph.del(target.name);
    throw err;
  }
}

/** The first backing (cow) node below `node`, through filters (bdrv_cow_bs(bdrv_skip_filters)). */
function cowBelow(node: BlockNode): BlockNode | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node as BlockNode | undefined) {
    if (n.backing) return n.backing.node as BlockNode;
    if (n.isFormat) return undefined;
  }
  return undefined;
}

/**
 * The backup job from `source` to `target` (backup_job_create), created with its filter in
 * place (the point-in-time) and not started: commit starts it, abort cancels it.
 */
async function backupPrepare(
  graph: BlockGraph,
  jobs: JobRegistry,
  source: BlockNode,
  target: BlockNode,
  o: BackupCommonOptions,
  txn: JobTxn | undefined,
): Promise<BackupAction> {
  const { sync, bitmapMode } = checkSync(source, o);
  if (source === target) throw bad('Source and target cannot be the same');
  const bm = o.bitmap !== undefined ? source.findDirtyBitmap(o.bitmap) : undefined;
  // A bitmap the job will reset must be changeable (backup_job_create).
  if (bm && bitmapMode !== 'never') checkDirtyBitmap(bm, BITMAP_DEFAULT);
  const ti = target.instance as Partial<FormatInstance>;
  if (o.compress && !(ti.kind === 'format' && ti.writeCompressed)) {
    throw bad('Compression is not supported for this drive ');
  }
  checkNotBusy(graph, source.name);
  checkNotBusy(graph, target.name);
  if (source.size() !== target.size()) throw bad('Source and target image have different sizes');
  let filter: BlockNode | undefined;
  let syncBitmap: SyncBitmap | undefined;
  let run: BackupRun | undefined;
  const dropFilter = async (): Promise<void> => {
    const f = filter;
    if (!f) return;
    filter = undefined;
    await graph.removeFilter(f.name, source.name);
  };
  const finishBitmap = (ok: boolean): void => {
    syncBitmap?.finish(ok, run?.o.cbw.copyBitmap);
    syncBitmap = undefined;
  };
  const bj = await BlockJob.create(
    graph,
    jobs,
    'backup',
    o,
    async (bj) => {
      try {
        // Drained with the filter's insertion: the point-in-time, and the bitmap frozen at it.
        filter = await graph.insertFilter(
          copyBeforeWriteDriver,
          source.name,
          o.filterNodeName,
          () => {
            if (bm && bitmapMode) syncBitmap = new SyncBitmap(source, bm, bitmapMode);
          },
          { children: { file: source.name, target: target.name } },
        );
        await bj.addNode(filter.name, [], ALL);
        await bj.addNode(target.name, [], ALL);
      } catch (err) {
        finishBitmap(false);
        await dropFilter();
        throw err;
      }
      const cbw = filter.instance as CopyBeforeWriteInstance;
      if (o.compress) {
        cbw.copy.compress = (offset, buf) => target.writeCompressed(offset, buf);
      }
      run = new BackupRun(bj, {
        source,
        target,
        cbw,
        sync,
        onSourceError: o.onSourceError ?? 'report',
        onTargetError: o.onTargetError ?? 'report',
      });
    },
    {
      run: () => run!.run(syncBitmap),
      prepare: async () => {
        finishBitmap(true);
        await dropFilter();
      },
      abort: async () => {
        finishBitmap(false);
        await dropFilter();
      },
    },
    txn,
  );
  return {
    bj,
    // QEMU runs the command in a drained section of the source, which pauses the new job
    // at its first pause point and resumes it at the end (clean): JOB_STATUS_CHANGE paused
    // and running come before the reply.
    commit: async () => {
      bj.begin();
      await pauseAtStart(jobs, bj);
    },
    abort: async () => {
      // In a job transaction, cancelling one job may have ended the others already.
      if (bj.job.status === 'created') bj.job.cancel(true);
      await bj.job.wait().catch(() => {});
    },
    clean: () => {
      if (bj.job.userPaused) bj.job.resume();
    },
  };
}

/** Pauses a job whose body has not run yet; resolves when it reached its first pause point. */
function pauseAtStart(jobs: JobRegistry, bj: BlockJob): Promise<void> {
  const reached = new Promise<void>((resolve) => {
    const off = jobs.onStatusChange((e) => {
      if (e.data.id !== bj.id || (e.data.status !== 'paused' && e.data.status !== 'null')) return;
      off();
      resolve();
    });
  });
  bj.job.pause();
  return reached;
}
