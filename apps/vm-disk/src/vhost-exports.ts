// The daemon's vhost-user-blk exports: a node's BlockBackend served by a
// VhostUserBlkServer of @vmdisk/vhost-user on a unix socket, with qemu-storage-daemon
// 7.2's checks and words. Unlike an NBD export, a connected front-end does not keep the
// export in use: block-export-del (safe or hard) disconnects it, as qemu-storage-daemon.
import type { BlockBackend, BlockGraph } from '@vmdisk/block-graph';
import { VhostUserBlkServer } from '@vmdisk/vhost-user';
import type { BlockExportInfo, BlockExportKind, ExportDeleted } from './export-kind.ts';
import type { Logger } from './log.ts';
import type { VhostUserBlkExportConfig } from './options/serve-options.ts';
import { QmpError } from './qmp/monitor.ts';

/** QEMU's limits of the logical-block-size property (DEFINE_PROP_BLOCKSIZE). */
const MIN_BLOCK_SIZE = 512;
const MAX_BLOCK_SIZE = 2 * 1024 * 1024;

interface VhostExport {
  config: VhostUserBlkExportConfig;
  backend: BlockBackend;
  server: VhostUserBlkServer;
}

export class VhostExports implements BlockExportKind<VhostUserBlkExportConfig> {
  private readonly exports = new Map<string, VhostExport>();
  private readonly graph: BlockGraph;
  private readonly log: Logger;
  private readonly onDeleted: ExportDeleted;

  constructor(graph: BlockGraph, log: Logger, onDeleted: ExportDeleted) {
    this.graph = graph;
    this.log = log;
    this.onDeleted = onDeleted;
  }

  /** Checks the options as qemu-storage-daemon does, then listens on the socket. */
  async add(config: VhostUserBlkExportConfig): Promise<void> {
    const { id, addr, logicalBlockSize: bs } = config;
    // In qemu-storage-daemon's order: the node, its writability, then the export's options.
    const node = this.graph.query().find((n) => n['node-name'] === config.nodeName);
    if (!node) {
      throw new QmpError(
        'GenericError',
        `Cannot find device='' nor node-name='${config.nodeName}'`,
      );
    }
    if (config.writable && node['read-only']) {
      throw new QmpError('GenericError', 'Cannot export read-only node as writable');
    }
    const backend = await this.graph.createBackend(config.nodeName, {
      name: `export:${id}`,
      write: config.writable,
      // As qemu-storage-daemon's vhost-user-blk export: the guest was told the size.
      shared: ['consistent-read', 'write', 'write-unchanged'],
    });
    // The export's own checks come after its backend was attached (blk_exp_add, then
    // vhost_user_blk_exp_create): a failure removes it again, which drains the node.
    try {
      if (addr.type !== 'unix') {
        throw new QmpError(
          'GenericError',
          "Only socket address types 'unix' and 'fd' are supported",
        );
      }
      if (bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE) {
        throw new QmpError(
          'GenericError',
          `Property ${id}.logical-block-size doesn't take value ${bs} (minimum: ${MIN_BLOCK_SIZE}, maximum: ${MAX_BLOCK_SIZE})`,
        );
      }
      if ((bs & (bs - 1)) !== 0) {
        throw new QmpError(
          'GenericError',
          `Property ${id}.logical-block-size doesn't take value '${bs}', it's not a power of 2`,
        );
      }
      if (config.numQueues === 0) {
        throw new QmpError('GenericError', 'num-queues must be greater than 0');
      }
    } catch (e) {
      await backend.close();
      throw e;
    }
    const server = new VhostUserBlkServer({
      path: addr.path,
      target: backend,
      writable: config.writable,
      logicalBlockSize: bs,
      numQueues: config.numQueues,
      writethrough: config.writethrough,
      onError: (err) =>
        this.log.warn(
          { event: 'vhost-user-error', id, code: err.code, err: err.message },
          'vhost-user-blk export: the front-end or guest misbehaved',
        ),
      onConnection: (connected) =>
        this.log.info(
          { event: connected ? 'vhost-user-connected' : 'vhost-user-disconnected', id },
          connected ? 'vhost-user front-end connected' : 'vhost-user front-end gone',
        ),
    });
    try {
      server.listen();
    } catch (e) {
      await backend.close();
      throw new QmpError('GenericError', (e as Error).message);
    }
    this.exports.set(id, { config, backend, server });
    this.log.info(
      { event: 'export-add', id, type: 'vhost-user-blk', node: config.nodeName, path: addr.path },
      'export added',
    );
  }

  /**
   * Removes an export, as qemu-storage-daemon's in either mode: its front-end
   * disconnected once its requests are done, the export gone (its event sent) before
   * this resolves.
   */
  async del(id: string): Promise<void> {
    const e = this.exports.get(id);
    if (!e) return;
    this.exports.delete(id);
    await e.server.close();
    await e.backend.close();
    this.log.info({ event: 'export-deleted', id }, 'export deleted');
    this.onDeleted(id);
  }

  info(id: string): BlockExportInfo | undefined {
    const e = this.exports.get(id);
    return (
      e && { type: 'vhost-user-blk', id, 'node-name': e.config.nodeName, 'shutting-down': false }
    );
  }

  async closeAll(): Promise<void> {
    for (const id of [...this.exports.keys()]) await this.del(id);
  }
}
