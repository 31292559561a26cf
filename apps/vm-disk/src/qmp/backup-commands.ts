// The QMP commands of backups, with QEMU 7.2's arguments (qapi/block-core.json
// BackupCommon): blockdev-backup and drive-backup. The work is in @vmdisk/block-graph
// (jobs/backup.ts); the events come as for every block job.
import { blockdevBackup, driveBackup, schema } from '@vmdisk/block-graph';
import { camel } from './camel.ts';
import type { DaemonControl } from './daemon-control.ts';
import type { QmpMonitor } from './monitor.ts';

const { bool, enumOf, int, opt, str, struct } = schema;

const onError = opt(enumOf(['report', 'ignore', 'stop', 'enospc']));

/** BackupCommon (x-perf is not taken). */
const backupCommon = {
  'job-id': opt(str),
  device: str,
  sync: enumOf(['top', 'full', 'none', 'incremental', 'bitmap']),
  speed: opt(int()),
  bitmap: opt(str),
  'bitmap-mode': opt(enumOf(['on-success', 'never', 'always'])),
  compress: opt(bool),
  'on-source-error': onError,
  'on-target-error': onError,
  'auto-finalize': opt(bool),
  'auto-dismiss': opt(bool),
  'filter-node-name': opt(str),
  target: str,
} as const;

/** blockdev-backup's arguments (also a transaction's action). */
export const blockdevBackupArgs = struct(backupCommon);

/** drive-backup's. */
export const driveBackupArgs = struct({
  ...backupCommon,
  format: opt(str),
  mode: opt(enumOf(['existing', 'absolute-paths'])),
});

export function registerBackupCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph, jobs } = daemon;
  monitor.register({
    name: 'blockdev-backup',
    args: blockdevBackupArgs,
    run: async (args) => {
      await blockdevBackup(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'drive-backup',
    args: driveBackupArgs,
    run: async (args) => {
      await driveBackup(graph, jobs, camel(args));
    },
  });
}
