// The QMP commands of `vm-disk serve`, with the arguments QEMU's schema gives them
// (qapi/block-core.json, block-export.json, job.json, qom.json), mapped onto the daemon
// (as the DaemonControl it implements: the composition root wires them).
import {
  type BlockdevCreateOptions,
  BlockError,
  BlockErrorCode,
  blockdevCreate,
} from '@vmdisk/block-graph';
import type { Schema } from '../options/schema.ts';
import {
  exportConfig,
  exportSchema,
  inetSocketAddress,
  NBD_SERVER_EXTENSIONS,
  socketAddressOf,
  unixSocketAddress,
} from '../options/serve-options.ts';
import { registerBlockJobCommands } from './block-job-commands.ts';
import type { DaemonControl } from './daemon-control.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const id: Schema = { id: { type: 'str', required: true } };

/** QEMU's SocketAddressLegacy (nbd-server-start's addr): {type, data: {...}}. */
const socketAddressLegacy = {
  union: {
    base: { type: { type: { enum: ['inet', 'unix'] }, required: true } },
    tag: 'type',
    variants: {
      inet: { data: { type: { struct: inetSocketAddress }, required: true } },
      unix: { data: { type: { struct: unixSocketAddress }, required: true } },
    },
  },
} as const;

/** The object registry's refusals (duplicate, missing, in use) as QEMU answers them. */
async function objectCommand(run: () => Promise<void>): Promise<void> {
  try {
    await run();
  } catch (e) {
    const codes: string[] = [
      BlockErrorCode.DUPLICATE_OBJECT,
      BlockErrorCode.OBJECT_NOT_FOUND,
      BlockErrorCode.OBJECT_IN_USE,
    ];
    if (e instanceof BlockError && codes.includes(e.code)) {
      throw new QmpError('GenericError', e.message);
    }
    throw e;
  }
}

export function registerCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const job = (jobId: unknown) => {
    const found = daemon.jobs.find(jobId as string);
    if (!found) throw new QmpError('GenericError', 'Job not found');
    return found;
  };

  monitor.register({
    name: 'blockdev-add',
    args: 'any', // checked by the block graph against the driver's options (typed: JSON)
    run: (args) => daemon.blockdevAdd(args, 'json'),
  });
  monitor.register({
    name: 'blockdev-del',
    args: { 'node-name': { type: 'str', required: true } },
    run: (args) => daemon.blockdevDel(args['node-name'] as string),
  });
  monitor.register({
    name: 'query-named-block-nodes',
    args: { flat: { type: 'bool' } },
    run: () => daemon.queryNamedBlockNodes(),
  });
  monitor.register({
    name: 'nbd-server-start',
    args: {
      addr: { type: socketAddressLegacy, required: true },
      'tls-creds': { type: 'str' },
      'tls-authz': { type: 'str' },
      'max-connections': { type: 'uint32' },
      ...NBD_SERVER_EXTENSIONS,
    },
    run: async (args) => {
      const addr = args.addr as { type: string; data: Record<string, unknown> };
      await daemon.nbdServerStart({
        addr: socketAddressOf({ type: addr.type, ...addr.data }),
        ...(args['tls-creds'] !== undefined && { tlsCreds: args['tls-creds'] as string }),
        ...(args['max-connections'] !== undefined && {
          maxConnections: args['max-connections'] as number,
        }),
        ...(args['request-memory-budget'] !== undefined && {
          requestMemoryBudget: args['request-memory-budget'] as number,
        }),
      });
    },
  });
  monitor.register({ name: 'nbd-server-stop', run: () => daemon.nbdServerStop() });
  monitor.register({
    name: 'block-export-add',
    args: exportSchema,
    run: (args) => daemon.blockExportAdd(exportConfig(args)),
  });
  monitor.register({
    name: 'block-export-del',
    args: { id: { type: 'str', required: true }, mode: { type: { enum: ['safe', 'hard'] } } },
    run: (args) =>
      daemon.blockExportDel(
        args.id as string,
        (args.mode as 'safe' | 'hard' | undefined) ?? 'safe',
      ),
  });
  monitor.register({ name: 'query-block-exports', run: () => daemon.queryBlockExports() });
  monitor.register({
    name: 'blockdev-create',
    // The options are checked by blockdev-create (typed, named 'options.KEY' as QEMU's);
    // a job ID in use is refused after them, as QEMU does.
    args: {
      'job-id': { type: 'str', required: true },
      options: { type: 'object', required: true },
    },
    run: (args) => {
      blockdevCreate(
        daemon.graph,
        daemon.jobs,
        args['job-id'] as string,
        args.options as BlockdevCreateOptions,
        'options.',
      );
    },
  });
  monitor.register({
    name: 'object-add',
    // ObjectOptions: qom-type, id and the type's properties, checked by the registry.
    args: 'any',
    run: (args) => objectCommand(() => daemon.objectAdd(args, 'json')),
  });
  monitor.register({
    name: 'object-del',
    args: id,
    run: (args) => objectCommand(() => daemon.objectDel(args.id as string)),
  });
  monitor.register({
    name: 'qom-list',
    // Only the container of user-created objects (/objects) is there to list.
    args: { path: { type: 'str', required: true } },
    run: (args) => {
      const path = args.path as string;
      if (!/^\/?objects\/?$/.test(path)) {
        throw new QmpError('DeviceNotFound', `Device '${path}' not found`);
      }
      return [
        { name: 'type', type: 'string' },
        ...daemon.graph.objects
          .list()
          .map((o) => ({ name: o.id, type: `child<${o['qom-type']}>` })),
      ];
    },
  });
  monitor.register({ name: 'query-jobs', run: () => daemon.jobs.query() });
  monitor.register({
    name: 'job-cancel',
    // QEMU's job-cancel takes only the id, and cancels by force (block-job-cancel has
    // the force argument).
    args: id,
    run: (args) => job(args.id).cancel(true),
  });
  monitor.register({ name: 'job-pause', args: id, run: (args) => job(args.id).pause() });
  monitor.register({ name: 'job-resume', args: id, run: (args) => job(args.id).resume() });
  monitor.register({ name: 'job-complete', args: id, run: (args) => job(args.id).complete() });
  monitor.register({ name: 'job-finalize', args: id, run: (args) => job(args.id).finalize() });
  monitor.register({ name: 'job-dismiss', args: id, run: (args) => job(args.id).dismiss() });
  registerBlockJobCommands(monitor, daemon);
  monitor.register({
    name: 'quit',
    run: () => {
      // Answer first, then stop (QEMU replies to quit before it shuts down).
      setImmediate(() => void daemon.stop());
    },
  });
}
