// The QMP commands of backups, with QEMU 7.2's arguments (qapi/block-core.json
// BackupCommon): blockdev-backup and drive-backup. The work is in @vmdisk/block-graph
// (jobs/backup.ts); the events come as for every block job.
import { blockdevBackup, driveBackup, schema } from '@vmdisk/block-graph';
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

type Camel<S extends string> = S extends `${infer H}-${infer T}`
  ? `${H}${Capitalize<Camel<T>>}`
  : S;
/** QMP's kebab-case members as the graph's camelCase options, absent ones left out. */
type CamelKeys<T> = { [K in keyof T as Camel<K & string>]: Exclude<T[K], undefined> };

function camel<T extends object>(args: T): CamelKeys<T> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(args)) {
    if (v !== undefined) out[k.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase())] = v;
  }
  return out as CamelKeys<T>;
}

export function registerBackupCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph, jobs } = daemon;
  monitor.register({
    name: 'blockdev-backup',
    args: struct(backupCommon),
    run: async (args) => {
      await blockdevBackup(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'drive-backup',
    args: struct({
      ...backupCommon,
      format: opt(str),
      mode: opt(enumOf(['existing', 'absolute-paths'])),
    }),
    run: async (args) => {
      await driveBackup(graph, jobs, camel(args));
    },
  });
}
