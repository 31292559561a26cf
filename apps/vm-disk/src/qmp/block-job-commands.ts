// The QMP commands of block jobs, snapshots and resize, with QEMU 7.2's arguments
// (qapi/block-core.json): block-stream, block-commit, block_resize, blockdev-snapshot,
// blockdev-snapshot-sync, query-block-jobs and the block-job-* verbs. The work is in
// @vmdisk/block-graph; the events (BLOCK_JOB_*) reach the monitor through the job
// registry's event sink, in order with JOB_STATUS_CHANGE.
import {
  type BlockJob,
  type BlockJobCommonOptions,
  blockCommit,
  blockdevSnapshot,
  blockdevSnapshotSync,
  blockJobs,
  blockResize,
  blockStream,
  findBlockJob,
} from '@vmdisk/block-graph';
import type { Schema } from '../options/schema.ts';
import type { DaemonControl } from './daemon-control.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const ON_ERROR = { enum: ['report', 'ignore', 'stop', 'enospc'] } as const;

/** The arguments block-stream and block-commit share. */
const jobCommon: Schema = {
  'job-id': { type: 'str' },
  device: { type: 'str', required: true },
  base: { type: 'str' },
  'base-node': { type: 'str' },
  'backing-file': { type: 'str' },
  speed: { type: 'int' },
  'on-error': { type: ON_ERROR },
  'auto-finalize': { type: 'bool' },
  'auto-dismiss': { type: 'bool' },
};

type Args = Record<string, unknown>;

function str(args: Args, key: string): string | undefined {
  return args[key] as string | undefined;
}

/** The members of BlockJobCommonOptions and the base / backing-file ones, as given. */
function common(args: Args): BlockJobCommonOptions & {
  device: string;
  base?: string;
  baseNode?: string;
  backingFile?: string;
} {
  const o: Args = { device: args.device };
  const map: [string, string][] = [
    ['job-id', 'jobId'],
    ['base', 'base'],
    ['base-node', 'baseNode'],
    ['backing-file', 'backingFile'],
    ['speed', 'speed'],
    ['on-error', 'onError'],
    ['auto-finalize', 'autoFinalize'],
    ['auto-dismiss', 'autoDismiss'],
  ];
  for (const [k, ours] of map) if (args[k] !== undefined) o[ours] = args[k];
  return o as unknown as ReturnType<typeof common>;
}

export function registerBlockJobCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph, jobs } = daemon;
  const blockJob = (id: unknown): BlockJob => {
    const found = findBlockJob(graph, id as string);
    if (!found) throw new QmpError('DeviceNotActive', `Block job '${String(id)}' not found`);
    return found;
  };
  const device = { device: { type: 'str', required: true } } as const;
  const id = { id: { type: 'str', required: true } } as const;

  monitor.register({
    name: 'block-stream',
    args: jobCommon,
    run: async (args) => {
      await blockStream(graph, jobs, common(args));
    },
  });
  monitor.register({
    name: 'block-commit',
    args: { ...jobCommon, top: { type: 'str' }, 'top-node': { type: 'str' } },
    run: async (args) => {
      const top = str(args, 'top');
      const topNode = str(args, 'top-node');
      await blockCommit(graph, jobs, {
        ...common(args),
        ...(top !== undefined && { top }),
        ...(topNode !== undefined && { topNode }),
      });
    },
  });
  monitor.register({
    name: 'block_resize',
    args: {
      device: { type: 'str' },
      'node-name': { type: 'str' },
      size: { type: 'int', required: true },
    },
    run: async (args) => {
      const dev = str(args, 'device');
      const nodeName = str(args, 'node-name');
      await blockResize(graph, {
        ...(dev !== undefined && { device: dev }),
        ...(nodeName !== undefined && { nodeName }),
        size: args.size as number,
      });
    },
  });
  monitor.register({
    name: 'blockdev-snapshot',
    args: { node: { type: 'str', required: true }, overlay: { type: 'str', required: true } },
    run: (args) => blockdevSnapshot(graph, args.node as string, args.overlay as string),
  });
  monitor.register({
    name: 'blockdev-snapshot-sync',
    args: {
      device: { type: 'str' },
      'node-name': { type: 'str' },
      'snapshot-file': { type: 'str', required: true },
      'snapshot-node-name': { type: 'str' },
      format: { type: 'str' },
      mode: { type: { enum: ['existing', 'absolute-paths'] } },
    },
    run: async (args) => {
      const o: Args = { snapshotFile: args['snapshot-file'] };
      const map: [string, string][] = [
        ['device', 'device'],
        ['node-name', 'nodeName'],
        ['snapshot-node-name', 'snapshotNodeName'],
        ['format', 'format'],
        ['mode', 'mode'],
      ];
      for (const [k, ours] of map) if (args[k] !== undefined) o[ours] = args[k];
      await blockdevSnapshotSync(graph, o as unknown as Parameters<typeof blockdevSnapshotSync>[1]);
    },
  });
  monitor.register({
    name: 'query-block-jobs',
    run: () => blockJobs(graph).map((j) => j.info()),
  });
  monitor.register({
    name: 'block-job-set-speed',
    args: { ...device, speed: { type: 'int', required: true } },
    run: (args) => {
      const speed = args.speed as number;
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
    args: { ...device, force: { type: 'bool' } },
    run: (args) => {
      const bj = blockJob(args.device);
      const force = (args.force as boolean | undefined) ?? false;
      if (bj.job.userPaused && !force) {
        throw new QmpError(
          'GenericError',
          `The block job for device '${bj.id}' is currently paused`,
        );
      }
      bj.job.cancel(force);
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
