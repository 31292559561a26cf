// The actions of QMP `transaction` that change the graph or its bitmaps, split as QEMU 7.2's
// TransactionActionDrv (blockdev.c): prepare does the work and the checks (it throws with
// the command's own words, having changed nothing), then every action commits, or every
// prepared one aborts, undoing what its prepare did; clean runs last either way. Backup
// jobs are in jobs/backup.ts (blockdevBackupPrepare, driveBackupPrepare).

import { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import {
  BITMAP_ALLOW_RO,
  BITMAP_BUSY,
  BITMAP_DEFAULT,
  BITMAP_RO,
  checkDirtyBitmap,
} from './dirty-bitmap-check.ts';
import {
  type BlockDirtyBitmapOrStr,
  blockDirtyBitmapAdd,
  blockDirtyBitmapMerge,
  lookupDirtyBitmap,
} from './dirty-bitmap-ops.ts';
import type { BlockGraph } from './graph.ts';
import {
  type BlockdevSnapshotSyncOptions,
  snapshotUndo,
  takeSnapshot,
  takeSnapshotSync,
} from './jobs/snapshot.ts';
import type { BlockNode } from './node.ts';
import type { DirtyBitmapAddOptions } from './node-dirty.ts';

/** One prepared action (QEMU's BlkActionState with its TransactionActionDrv). */
export interface PreparedAction {
  commit?(): void | Promise<void>;
  abort?(): void | Promise<void>;
  clean?(): void | Promise<void>;
}

/** A copy of the bitmap's bits, and how to put them back (bdrv_restore_dirty_bitmap). */
function backupBits(bitmap: BdrvDirtyBitmap): PreparedAction {
  const saved = new BdrvDirtyBitmap(bitmap.size, bitmap.granularity);
  saved.merge(bitmap);
  return {
    abort: () => {
      bitmap.clear();
      bitmap.merge(saved);
    },
  };
}

/** block-dirty-bitmap-add: abort removes the bitmap again. */
export function bitmapAddPrepare(
  graph: BlockGraph,
  o: { node: string; name: string } & DirtyBitmapAddOptions,
): PreparedAction {
  const bitmap = blockDirtyBitmapAdd(graph, o);
  return { abort: () => (graph.node(o.node) as BlockNode).releaseDirtyBitmap(bitmap) };
}

/**
 * block-dirty-bitmap-remove: prepare takes a persistent bitmap out of the image and keeps
 * it busy; commit drops it; abort gives it back (it is stored again at close).
 */
export async function bitmapRemovePrepare(
  graph: BlockGraph,
  node: string,
  name: string,
): Promise<PreparedAction> {
  const found = lookupDirtyBitmap(graph, node, name);
  const { bitmap } = found;
  checkDirtyBitmap(bitmap, BITMAP_BUSY | BITMAP_RO);
  if (bitmap.persistent && bitmap.name !== undefined) {
    await found.node.instance.persistentBitmaps?.remove(bitmap.name);
  }
  bitmap.busy = true;
  return {
    commit: () => {
      bitmap.busy = false;
      found.node.releaseDirtyBitmap(bitmap);
    },
    abort: () => {
      bitmap.busy = false;
    },
  };
}

/** block-dirty-bitmap-clear: abort restores the bits. */
export function bitmapClearPrepare(graph: BlockGraph, node: string, name: string): PreparedAction {
  const { bitmap } = lookupDirtyBitmap(graph, node, name);
  checkDirtyBitmap(bitmap, BITMAP_DEFAULT);
  const saved = backupBits(bitmap);
  bitmap.clear();
  return saved;
}

/** block-dirty-bitmap-enable / -disable: abort sets recording back. */
export function bitmapEnablePrepare(
  graph: BlockGraph,
  node: string,
  name: string,
  enabled: boolean,
): PreparedAction {
  const { bitmap } = lookupDirtyBitmap(graph, node, name);
  checkDirtyBitmap(bitmap, BITMAP_ALLOW_RO);
  const was = bitmap.enabled;
  bitmap.enabled = enabled;
  return {
    abort: () => {
      bitmap.enabled = was;
    },
  };
}

/** block-dirty-bitmap-merge: abort restores the target's bits. */
export function bitmapMergePrepare(
  graph: BlockGraph,
  node: string,
  target: string,
  bitmaps: readonly BlockDirtyBitmapOrStr[],
): PreparedAction {
  const { bitmap } = lookupDirtyBitmap(graph, node, target);
  const saved = backupBits(bitmap);
  blockDirtyBitmapMerge(graph, node, target, bitmaps);
  return saved;
}

/**
 * blockdev-snapshot: abort takes the overlay off again (external_snapshot_abort); the
 * node stays drained from prepare to clean, as QEMU's.
 */
export async function snapshotPrepare(
  graph: BlockGraph,
  node: string,
  overlay: string,
): Promise<PreparedAction> {
  const taken = await takeSnapshot(graph, node, overlay);
  return { abort: () => snapshotUndo(graph, node, overlay), clean: taken.end };
}

/** blockdev-snapshot-sync: abort takes the overlay off and closes it (its file stays). */
export async function snapshotSyncPrepare(
  graph: BlockGraph,
  o: BlockdevSnapshotSyncOptions,
): Promise<PreparedAction> {
  const { node, overlay, end } = await takeSnapshotSync(graph, o);
  return {
    abort: async () => {
      await snapshotUndo(graph, node, overlay);
      await graph.del(overlay);
    },
    clean: end,
  };
}
