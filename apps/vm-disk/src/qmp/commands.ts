// The QMP commands of `vm-disk serve`, with the arguments QEMU's schema gives them
// (qapi/block-core.json, block-export.json, job.json, qom.json), mapped onto the daemon
// (as the DaemonControl it implements: the composition root wires them).
import {
  BlockError,
  BlockErrorCode,
  blockdevCreate,
  blockdevCreateOptions,
  debugQueryBlockGraph,
  objectOptions,
  schema,
} from '@vmdisk/block-graph';
import {
  exportConfig,
  exportOptions,
  inetSocketAddress,
  NBD_SERVER_EXTENSIONS,
  nbdServerConfig,
  unixSocketAddress,
} from '../options/serve-options.ts';
import { registerBackupCommands } from './backup-commands.ts';
import { registerBitmapCommands } from './bitmap-commands.ts';
import { registerBlockJobCommands } from './block-job-commands.ts';
import { registerStatsCommands } from './blockstats.ts';
import { registerChardevCommands } from './chardev-commands.ts';
import type { DaemonControl } from './daemon-control.ts';
import { declareEvents } from './events.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';
import { registerQomCommands } from './qom-commands.ts';
import { registerQueryBlock } from './query-block.ts';
import { registerReopenCommands } from './reopen-commands.ts';
import { registerTransactionCommands } from './transaction-commands.ts';

const { enumOf, opt, str, struct, uint32, union } = schema;

const id = struct({ id: str });

/** QEMU's SocketAddressLegacy (nbd-server-start's addr): {type, data: {...}}. */
const socketAddressLegacy = union(
  'type',
  {},
  {
    inet: { data: struct(inetSocketAddress) },
    unix: { data: struct(unixSocketAddress) },
  },
);

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
  const job = (jobId: string) => {
    const found = daemon.jobs.find(jobId);
    if (!found) throw new QmpError('GenericError', 'Job not found');
    return found;
  };

  monitor.register({
    name: 'blockdev-add',
    // Checked by the block graph against the driver's options (typed: JSON); described
    // (query-qmp-schema) as the union of the drivers' options it checks them against.
    args: { ...schema.object('BlockdevOptions'), info: daemon.graph.optionsInfo() },
    run: (args) => daemon.blockdevAdd(args, 'json'),
  });
  monitor.register({
    name: 'blockdev-del',
    args: struct({ 'node-name': str }),
    run: (args) => daemon.blockdevDel(args['node-name']),
  });
  monitor.register({
    name: 'query-named-block-nodes',
    args: struct({ flat: opt(schema.bool) }),
    run: (args) => daemon.queryNamedBlockNodes(args.flat === true),
  });
  monitor.register({
    name: 'nbd-server-start',
    args: struct({
      addr: socketAddressLegacy,
      'tls-creds': opt(str),
      'tls-authz': opt(str),
      'max-connections': opt(uint32),
      ...NBD_SERVER_EXTENSIONS,
    }),
    run: async ({ addr, ...args }) => {
      const flat =
        addr.type === 'inet'
          ? { type: addr.type, ...addr.data }
          : { type: addr.type, ...addr.data };
      await daemon.nbdServerStart(nbdServerConfig(args, flat));
    },
  });
  monitor.register({ name: 'nbd-server-stop', run: () => daemon.nbdServerStop() });
  monitor.register({
    name: 'block-export-add',
    args: exportOptions,
    run: (args) => daemon.blockExportAdd(exportConfig(args)),
  });
  monitor.register({
    name: 'block-export-del',
    args: struct({ id: str, mode: opt(enumOf(['safe', 'hard']), 'safe') }),
    run: (args) => daemon.blockExportDel(args.id, args.mode),
  });
  monitor.register({ name: 'query-block-exports', run: () => daemon.queryBlockExports() });
  monitor.register({
    name: 'blockdev-create',
    // The options are checked by blockdev-create (typed, named 'options.KEY' as QEMU's);
    // a job ID in use is refused after them, as QEMU does.
    args: struct({ 'job-id': str, options: blockdevCreateOptions }),
    run: (args) => {
      blockdevCreate(daemon.graph, daemon.jobs, args['job-id'], args.options, 'options.');
    },
  });
  monitor.register({
    name: 'object-add',
    // ObjectOptions: qom-type, id and the type's properties (the registry's schema).
    args: objectOptions,
    run: (args) => objectCommand(() => daemon.objectAdd(args, 'json')),
  });
  monitor.register({
    name: 'object-del',
    args: id,
    run: (args) => objectCommand(() => daemon.objectDel(args.id)),
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
  monitor.register({
    name: 'job-finalize',
    args: id,
    run: async (args) => {
      // QEMU finalizes within the command: the transaction's events come before the reply.
      const found = job(args.id);
      found.finalize();
      await found.wait().catch(() => {});
    },
  });
  monitor.register({ name: 'job-dismiss', args: id, run: (args) => job(args.id).dismiss() });
  monitor.register({
    name: 'block-set-write-threshold',
    args: struct({ 'node-name': str, 'write-threshold': schema.uint64 }),
    run: (args) => {
      if (!daemon.graph.hasNode(args['node-name'])) {
        throw new QmpError('GenericError', `Device '${args['node-name']}' not found`);
      }
      daemon.graph.setWriteThreshold(args['node-name'], args['write-threshold']);
    },
  });
  monitor.register({
    name: 'x-debug-query-block-graph',
    run: () => debugQueryBlockGraph(daemon.graph),
  });
  registerBlockJobCommands(monitor, daemon);
  registerReopenCommands(monitor, daemon);
  registerBackupCommands(monitor, daemon);
  registerBitmapCommands(monitor, daemon);
  registerTransactionCommands(monitor, daemon);
  registerStatsCommands(monitor, daemon.graph);
  registerQueryBlock(monitor);
  registerChardevCommands(monitor, daemon.chardevs);
  registerQomCommands(monitor, daemon);
  declareEvents(monitor);
  monitor.register({
    name: 'quit',
    run: async () => {
      // qemu-storage-daemon's exports are gone (their events sent) before it answers;
      // the rest stops after the answer.
      await daemon.closeExports();
      setImmediate(() => void daemon.stop());
    },
  });
}
