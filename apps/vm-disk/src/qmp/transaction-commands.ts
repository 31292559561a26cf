// QMP `transaction` (QEMU 7.2 blockdev.c qmp_transaction): its actions, each the argument
// schema of the command it stands for, prepared in order; if one fails, the prepared ones
// abort in reverse order and its error is the reply (nothing changed); otherwise all
// commit. Clean runs last either way. completion-mode 'grouped' puts the backup jobs in
// one job transaction: if one fails or is cancelled, all are, and none touches its bitmap.
// blockdev-snapshot and blockdev-snapshot-sync are transactions of one action, as QEMU's.
// The prepare/commit/abort of each action are in @vmdisk/block-graph (transaction.ts,
// jobs/backup.ts).

import type { JobTxn } from '@vmdisk/ao';
import {
  bitmapAddPrepare,
  bitmapClearPrepare,
  bitmapEnablePrepare,
  bitmapMergePrepare,
  bitmapRemovePrepare,
  blockdevBackupPrepare,
  driveBackupPrepare,
  type PreparedAction,
  schema,
  snapshotPrepare,
  snapshotSyncPrepare,
} from '@vmdisk/block-graph';
import { blockdevBackupArgs, driveBackupArgs } from './backup-commands.ts';
import {
  blockDirtyBitmap,
  blockDirtyBitmapAddArgs,
  blockDirtyBitmapMergeArgs,
} from './bitmap-commands.ts';
import { blockdevSnapshotArgs, blockdevSnapshotSyncArgs } from './block-job-commands.ts';
import { camel } from './camel.ts';
import type { DaemonControl } from './daemon-control.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const { enumOf, list, opt, struct, union } = schema;

/** TransactionAction: {type, data} (QEMU's legacy "simple union" on the wire). */
const transactionAction = union(
  'type',
  {},
  {
    abort: { data: struct({}) },
    'block-dirty-bitmap-add': { data: blockDirtyBitmapAddArgs },
    'block-dirty-bitmap-remove': { data: blockDirtyBitmap },
    'block-dirty-bitmap-clear': { data: blockDirtyBitmap },
    'block-dirty-bitmap-enable': { data: blockDirtyBitmap },
    'block-dirty-bitmap-disable': { data: blockDirtyBitmap },
    'block-dirty-bitmap-merge': { data: blockDirtyBitmapMergeArgs },
    'blockdev-backup': { data: blockdevBackupArgs },
    'blockdev-snapshot': { data: blockdevSnapshotArgs },
    'blockdev-snapshot-sync': { data: blockdevSnapshotSyncArgs },
    'drive-backup': { data: driveBackupArgs },
  },
);

type Action = ReturnType<typeof transactionAction.parse>;

const completionMode = enumOf(['individual', 'grouped']);

/** The actions whose prepare refuses grouped completion (action_check_completion_mode). */
const INDIVIDUAL_ONLY = new Set<string>([
  'block-dirty-bitmap-add',
  'block-dirty-bitmap-remove',
  'block-dirty-bitmap-clear',
  'block-dirty-bitmap-enable',
  'block-dirty-bitmap-disable',
  'block-dirty-bitmap-merge',
  'blockdev-snapshot',
  'blockdev-snapshot-sync',
]);

export function registerTransactionCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph, jobs } = daemon;

  /** One action's prepare (the command's own checks and words). */
  function prepare(a: Action, txn: JobTxn | undefined): PreparedAction | Promise<PreparedAction> {
    switch (a.type) {
      case 'abort':
        throw new QmpError('GenericError', 'Transaction aborted using Abort action');
      case 'block-dirty-bitmap-add':
        return bitmapAddPrepare(graph, a.data);
      case 'block-dirty-bitmap-remove':
        return bitmapRemovePrepare(graph, a.data.node, a.data.name);
      case 'block-dirty-bitmap-clear':
        return bitmapClearPrepare(graph, a.data.node, a.data.name);
      case 'block-dirty-bitmap-enable':
      case 'block-dirty-bitmap-disable':
        return bitmapEnablePrepare(
          graph,
          a.data.node,
          a.data.name,
          a.type === 'block-dirty-bitmap-enable',
        );
      case 'block-dirty-bitmap-merge':
        return bitmapMergePrepare(graph, a.data.node, a.data.target, a.data.bitmaps);
      case 'blockdev-backup':
        return blockdevBackupPrepare(graph, jobs, camel(a.data), txn);
      case 'drive-backup':
        return driveBackupPrepare(graph, jobs, camel(a.data), txn);
      case 'blockdev-snapshot':
        return snapshotPrepare(graph, a.data.node, a.data.overlay);
      case 'blockdev-snapshot-sync':
        return snapshotSyncPrepare(graph, camel(a.data));
    }
  }

  /**
   * Runs `actions` as one transaction. QEMU begins with bdrv_drain_all: every block job
   * with a node pauses and resumes, before the actions (which may drain nodes of their
   * own: a snapshot's node, from its prepare to its clean).
   */
  async function transaction(actions: readonly Action[], mode: 'individual' | 'grouped') {
    const txn = mode === 'grouped' ? jobs.createTransaction() : undefined;
    const prepared: PreparedAction[] = [];
    await graph.lock.write(() => undefined, 'all');
    // Drained: no guest write comes between the actions (one point-in-time for all).
    await graph.drainedBegin();
    try {
      try {
        for (const a of actions) {
          if (mode !== 'individual' && INDIVIDUAL_ONLY.has(a.type)) {
            throw new QmpError(
              'GenericError',
              `Action '${a.type}' does not support Transaction property completion-mode = ${mode}`,
            );
          }
          prepared.push(await prepare(a, txn));
        }
      } catch (err) {
        for (const p of [...prepared].reverse()) await p.abort?.();
        throw err;
      }
      for (const p of prepared) await p.commit?.();
    } finally {
      graph.drainedEnd();
      // The drained section ends at the last action's clean: QEMU resumes the jobs it
      // paused newest first.
      for (const p of [...prepared].reverse()) await p.clean?.();
    }
  }

  monitor.register({
    name: 'transaction',
    args: struct({
      actions: list(transactionAction),
      properties: opt(struct({ 'completion-mode': opt(completionMode) })),
    }),
    run: (args) => transaction(args.actions, args.properties?.['completion-mode'] ?? 'individual'),
  });
  // QEMU runs both as a transaction of one action (blockdev_do_action).
  monitor.register({
    name: 'blockdev-snapshot',
    args: blockdevSnapshotArgs,
    run: (data) => transaction([{ type: 'blockdev-snapshot', data }], 'individual'),
  });
  monitor.register({
    name: 'blockdev-snapshot-sync',
    args: blockdevSnapshotSyncArgs,
    run: (data) => transaction([{ type: 'blockdev-snapshot-sync', data }], 'individual'),
  });
}
