// The QMP commands of `vm-disk serve`, with the arguments QEMU's schema gives them
// (qapi/block-core.json, block-export.json, job.json), mapped onto the daemon.
import { type BlockdevCreateOptions, blockdevCreate } from '@vmdisk/block-graph';
import type { Daemon } from '../daemon.ts';
import type { Schema } from '../options/schema.ts';
import { exportConfig, exportSchema, NBD_SERVER_EXTENSIONS } from '../options/serve-options.ts';
import { QmpError, type QmpMonitor } from './monitor.ts';

const id: Schema = { id: { type: 'str', required: true } };

const socketAddressLegacy: Schema = {
  type: { type: { enum: ['inet', 'unix'] }, required: true },
  data: {
    type: {
      struct: { host: { type: 'str' }, port: { type: 'str' }, path: { type: 'str' } },
    },
    required: true,
  },
};

export function registerCommands(monitor: QmpMonitor, daemon: Daemon): void {
  const job = (jobId: unknown) => {
    const found = daemon.jobs.find(String(jobId));
    if (!found) throw new QmpError('GenericError', 'Job not found');
    return found;
  };

  monitor.register({
    name: 'blockdev-add',
    args: 'any', // checked by the block graph against the driver's options
    run: async (args) => {
      if (typeof args['node-name'] !== 'string') {
        throw new QmpError('GenericError', "'node-name' must be specified for the root node");
      }
      await daemon.blockdevAdd(args);
    },
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
      addr: { type: { struct: socketAddressLegacy }, required: true },
      'tls-creds': { type: 'str' },
      'tls-authz': { type: 'str' },
      'max-connections': { type: 'int' },
      ...NBD_SERVER_EXTENSIONS,
    },
    run: async (args) => {
      const addr = args.addr as { type: 'inet' | 'unix'; data: Record<string, string | undefined> };
      const { host, port, path } = addr.data;
      if (addr.type === 'inet' && (host === undefined || port === undefined)) {
        throw new QmpError(
          'GenericError',
          `Parameter 'addr.data.${host === undefined ? 'host' : 'port'}' is missing`,
        );
      }
      if (addr.type === 'unix' && path === undefined) {
        throw new QmpError('GenericError', "Parameter 'addr.data.path' is missing");
      }
      await daemon.nbdServerStart({
        addr:
          addr.type === 'inet'
            ? { type: 'inet', host: host as string, port: port as string }
            : { type: 'unix', path: path as string },
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
    args: { 'job-id': { type: 'str', required: true }, options: { type: 'any', required: true } },
    run: (args) => {
      const options = args.options;
      if (
        typeof options !== 'object' ||
        options === null ||
        Array.isArray(options) ||
        typeof (options as { driver?: unknown }).driver !== 'string'
      ) {
        throw new QmpError('GenericError', "Parameter 'options.driver' is missing");
      }
      if (daemon.jobs.find(args['job-id'] as string)) {
        throw new QmpError('GenericError', `Job ID '${args['job-id']}' already in use`);
      }
      blockdevCreate(
        daemon.graph,
        daemon.jobs,
        args['job-id'] as string,
        options as BlockdevCreateOptions,
      );
    },
  });
  monitor.register({ name: 'query-jobs', run: () => daemon.jobs.query() });
  monitor.register({
    name: 'job-cancel',
    args: { id: { type: 'str', required: true }, force: { type: 'bool' } },
    run: (args) => job(args.id).cancel((args.force as boolean | undefined) ?? false),
  });
  monitor.register({ name: 'job-pause', args: id, run: (args) => job(args.id).pause() });
  monitor.register({ name: 'job-resume', args: id, run: (args) => job(args.id).resume() });
  monitor.register({ name: 'job-complete', args: id, run: (args) => job(args.id).complete() });
  monitor.register({ name: 'job-finalize', args: id, run: (args) => job(args.id).finalize() });
  monitor.register({ name: 'job-dismiss', args: id, run: (args) => job(args.id).dismiss() });
  monitor.register({
    name: 'quit',
    run: () => {
      // Answer first, then stop (QEMU replies to quit before it shuts down).
      setImmediate(() => void daemon.stop());
    },
  });
}
