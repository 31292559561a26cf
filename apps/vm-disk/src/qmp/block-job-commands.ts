// The QMP commands of block jobs and resize, with QEMU 7.2's arguments
// (qapi/block-core.json): block-stream, block-commit, block_resize, query-block-jobs and
// the block-job-* verbs; the arguments of blockdev-snapshot and blockdev-snapshot-sync
// (transaction-commands.ts runs them). The work is in
// @vmdisk/block-graph; the events (BLOCK_JOB_*) reach the monitor through the job
// registry's event sink, in order with JOB_STATUS_CHANGE.
import {
  type BlockJob,
  blockCommit,
  blockdevMirror,
  blockJobs,
  blockResize,
  blockStream,
  driveMirror,
  findBlockJob,
  schema,
} from '@vmdisk/block-graph';
import { camel } from './camel.ts';
import type { DaemonControl } from './daemon-control.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const { bool, enumOf, int, opt, str, struct } = schema;

/** block-stream's arguments, in QEMU's order (its first error is on the first bad member). */
const streamArgs = {
  'job-id': opt(str),
  device: str,
  base: opt(str),
  'base-node': opt(str),
  'backing-file': opt(str),
  bottom: opt(str),
  speed: opt(int()),
  'on-error': opt(enumOf(['report', 'ignore', 'stop', 'enospc'])),
  'filter-node-name': opt(str),
  'auto-finalize': opt(bool),
  'auto-dismiss': opt(bool),
} as const;

/** block-commit's, in QEMU's order. */
const commitArgs = {
  'job-id': streamArgs['job-id'],
  device: str,
  'base-node': opt(str),
  base: opt(str),
  'top-node': opt(str),
  top: opt(str),
  'backing-file': opt(str),
  speed: streamArgs.speed,
  'on-error': streamArgs['on-error'],
  'filter-node-name': opt(str),
  'auto-finalize': opt(bool),
  'auto-dismiss': opt(bool),
} as const;

const onError = streamArgs['on-error'];

/** blockdev-mirror's arguments in QEMU's order (its first error is on the first bad member). */
const blockdevMirrorArgs = {
  'job-id': opt(str),
  device: str,
  target: str,
  replaces: opt(str),
  sync: enumOf(['top', 'full', 'none', 'incremental', 'bitmap']),
  speed: opt(int()),
  granularity: opt(int()),
  'buf-size': opt(int()),
  'on-source-error': onError,
  'on-target-error': onError,
  'filter-node-name': opt(str),
  'copy-mode': opt(enumOf(['background', 'write-blocking'])),
  'auto-finalize': opt(bool),
  'auto-dismiss': opt(bool),
} as const;

/** drive-mirror's: a target to open or create, and no filter-node-name (QEMU 7.2's). */
const m = blockdevMirrorArgs;
const driveMirrorArgs = {
  'job-id': m['job-id'],
  device: m.device,
  target: m.target,
  format: opt(str),
  'node-name': opt(str),
  replaces: m.replaces,
  sync: m.sync,
  mode: opt(enumOf(['existing', 'absolute-paths'])),
  speed: m.speed,
  granularity: m.granularity,
  'buf-size': m['buf-size'],
  'on-source-error': m['on-source-error'],
  'on-target-error': m['on-target-error'],
  unmap: opt(bool),
  'copy-mode': m['copy-mode'],
  'auto-finalize': m['auto-finalize'],
  'auto-dismiss': m['auto-dismiss'],
} as const;

/** BlockdevSnapshot (also a transaction's action). */
export const blockdevSnapshotArgs = struct({ node: str, overlay: str });

/** BlockdevSnapshotSync. */
export const blockdevSnapshotSyncArgs = struct({
  device: opt(str),
  'node-name': opt(str),
  'snapshot-file': str,
  'snapshot-node-name': opt(str),
  format: opt(str),
  mode: opt(enumOf(['existing', 'absolute-paths'])),
});

function noReplaces(replaces: string | undefined): void {
  if (replaces !== undefined) {
    throw new QmpError('GenericError', "Parameter 'replaces' is not supported");
  }
}

export function registerBlockJobCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph, jobs } = daemon;
  const blockJob = (id: string): BlockJob => {
    const found = findBlockJob(graph, id);
    if (!found) throw new QmpError('DeviceNotActive', `Block job '${String(id)}' not found`);
    return found;
  };
  const device = struct({ device: str });
  const id = struct({ id: str });

  monitor.register({
    name: 'block-stream',
    args: struct(streamArgs),
    run: async (args) => {
      await blockStream(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'block-commit',
    args: struct(commitArgs),
    run: async (args) => {
      await blockCommit(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'blockdev-mirror',
    args: struct(blockdevMirrorArgs),
    run: async (args) => {
      await blockdevMirror(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'drive-mirror',
    args: struct(driveMirrorArgs),
    run: async (args) => {
      noReplaces(args.replaces);
      await driveMirror(graph, jobs, camel(args));
    },
  });
  monitor.register({
    name: 'block_resize',
    args: struct({ device: opt(str), 'node-name': opt(str), size: int() }),
    run: async (args) => {
      await blockResize(graph, camel(args));
    },
  });
  monitor.register({
    name: 'query-block-jobs',
    run: () => blockJobs(graph).map((j) => j.info()),
  });
  monitor.register({
    name: 'block-job-set-speed',
    args: struct({ device: str, speed: int() }),
    run: (args) => {
      const { speed } = args;
      if (speed < 0) {
        throw new QmpError('GenericError', "Parameter 'speed' expects a non-negative value");
      }
      blockJob(args.device).job.setSpeed(speed);
    },
  });
  monitor.register({
    name: 'block-job-pause',
    args: device,
    run: (args) => blockJob(args.device).job.pause(),
  });
  monitor.register({
    name: 'block-job-resume',
    args: device,
    run: (args) => {
      const bj = blockJob(args.device);
      bj.job.resume();
      bj.iostatus = 'ok'; // QEMU resets the io-status on resume
    },
  });
  monitor.register({
    name: 'block-job-cancel',
    args: struct({ device: str, force: opt(bool, false) }),
    run: async (args) => {
      const bj = blockJob(args.device);
      const { force } = args;
      if (bj.job.userPaused && !force) {
        throw new QmpError(
          'GenericError',
          `The block job for device '${bj.id}' is currently paused`,
        );
      }
      // A job done with its work (waiting, pending) is aborted within QEMU's command
      // (job_completed_txn_abort): its events come before the reply.
      const done = bj.job.status === 'waiting' || bj.job.status === 'pending';
      bj.job.cancel(force);
      if (done && bj.job.isCancelled) await bj.job.wait().catch(() => {});
    },
  });
  monitor.register({
    name: 'block-job-complete',
    args: device,
    run: (args) => blockJob(args.device).job.complete(),
  });
  monitor.register({
    name: 'block-job-finalize',
    args: id,
    run: async (args) => {
      // QEMU finalizes within the command: its events come before the reply.
      const job = blockJob(args.id).job;
      job.finalize();
      await job.wait().catch(() => {});
    },
  });
  monitor.register({
    name: 'block-job-dismiss',
    args: id,
    run: (args) => blockJob(args.id).job.dismiss(),
  });
}
