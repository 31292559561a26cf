// The daemon's NBD server (nbd-server-start/-stop, --nbd-server) and its exports: each a
// node's BlockBackend served by @vmdisk/nbd, with qemu-storage-daemon 7.2's checks and
// words. An export with clients attached stays until they are gone (block-export-del
// 'hard' disconnects them; 'safe' is refused).
import {
  type BlockBackend,
  type BlockGraph,
  type ExportedBitmaps,
  exportDirtyBitmaps,
  type NbdTlsCreds,
  type PermissionName,
} from '@vmdisk/block-graph';
import { dupFd, recvNow, socketSender } from '@vmdisk/engine';
import {
  type ListenAddress,
  type NbdError,
  NbdServer,
  type NbdServerTlsOptions,
} from '@vmdisk/nbd';
import { VmDiskError } from './errors.ts';
import type { BlockExportInfo, BlockExportKind, ExportDeleted } from './export-kind.ts';
import type { IoThreadExport, IoThreads } from './iothreads/iothreads.ts';
import type { Logger } from './log.ts';
import { configureNbdSocket } from './nbd-socket.ts';
import type { NbdExportConfig, NbdServerConfig, SocketAddress } from './options/serve-options.ts';
import { QmpError } from './qmp/monitor.ts';
import { serverTlsOptions } from './tls-creds.ts';

interface NbdExportEntry {
  config: NbdExportConfig;
  name: string;
  backend: BlockBackend;
  /** The dirty bitmaps it offers (busy until the export is gone). */
  bitmaps: ExportedBitmaps | undefined;
  /** Served in iothreads (`iothread`). */
  iothreads: IoThreadExport | undefined;
  shuttingDown: boolean;
}

export class NbdExports implements BlockExportKind<NbdExportConfig> {
  private nbd: { server: NbdServer; address: ListenAddress } | undefined;
  private readonly exports = new Map<string, NbdExportEntry>();
  private readonly graph: BlockGraph;
  private readonly iothreads: IoThreads;
  private readonly log: Logger;
  private readonly onDeleted: ExportDeleted;

  constructor(graph: BlockGraph, iothreads: IoThreads, log: Logger, onDeleted: ExportDeleted) {
    this.graph = graph;
    this.iothreads = iothreads;
    this.log = log;
    this.onDeleted = onDeleted;
  }

  get address(): ListenAddress | undefined {
    return this.nbd?.address;
  }

  /** The server and its exports (id, NBD name, node), for the metrics endpoint. */
  list(): { server: NbdServer | undefined; exports: { id: string; name: string; node: string }[] } {
    const exports = [...this.exports.values()].map((e) => ({
      id: e.config.id,
      name: e.name,
      node: e.config.nodeName,
    }));
    return { server: this.nbd?.server, exports };
  }

  async start(config: NbdServerConfig): Promise<ListenAddress> {
    if (this.nbd) throw new QmpError('GenericError', 'NBD server already running');
    const tls = config.tlsCreds !== undefined ? this.serverTls(config.tlsCreds) : undefined;
    const budget = config.requestMemoryBudget;
    if (budget !== undefined && !(Number.isSafeInteger(budget) && budget >= 1)) {
      throw new QmpError(
        'GenericError',
        "Parameter 'request-memory-budget' expects a size of at least 1 byte",
      );
    }
    const server = new NbdServer({
      configureSocket: configureNbdSocket,
      dupFd,
      recv: recvNow,
      fileSender: socketSender,
      ...(config.maxConnections !== undefined && { maxConnections: config.maxConnections || 1024 }),
      ...(budget !== undefined && { requestMemoryBudget: budget }),
      ...(tls && { tls }),
    });
    server.on('connection', (c) =>
      this.log.info({ event: 'nbd-connect', ...c }, 'NBD client connected'),
    );
    server.on('disconnect', (c) =>
      this.log.info({ event: 'nbd-disconnect', ...c }, 'NBD client disconnected'),
    );
    server.on('error', (c) =>
      this.log.warn(
        { event: 'nbd-client-error', ...c, error: c.error.message, code: c.error.code },
        'NBD client error',
      ),
    );
    const address = await server.listen(listenOptions(config.addr));
    this.nbd = { server, address };
    this.log.info(
      { event: 'nbd-listening', address, tls: tls !== undefined },
      'NBD server listening',
    );
    return address;
  }

  /** nbd-server-stop: every client disconnected, every export gone. */
  async stop(): Promise<void> {
    const nbd = this.nbd;
    if (!nbd) throw new QmpError('GenericError', 'NBD server not running');
    this.nbd = undefined;
    const ids = [...this.exports.keys()];
    await nbd.server.close();
    await Promise.all(ids.map((id) => this.exportGone(id)));
    this.log.info({ event: 'nbd-stopped' }, 'NBD server stopped');
  }

  /**
   * In QEMU's order: the node gets its backend first (blk_exp_add: it takes what the
   * export needs and shares everything), then the NBD export's checks and its
   * permissions (nbd_export_create: resize unshared). A failure there removes the
   * backend again, which drains the node (graph.ts detachBackend).
   */
  async add(config: NbdExportConfig): Promise<void> {
    const perm: PermissionName[] = [
      'consistent-read',
      ...(config.writable ? ['write' as const] : []),
    ];
    const backend = await this.graph.createBackend(config.nodeName, {
      name: `export:${config.id}`,
      perm,
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
    const name = config.name ?? config.nodeName;
    let bitmaps: ExportedBitmaps | undefined;
    let iothreads: IoThreadExport | undefined;
    try {
      if (!this.nbd) throw new QmpError('GenericError', 'NBD server not running');
      if ([...this.exports.values()].some((e) => e.name === name)) {
        throw new QmpError('GenericError', `NBD server already has export named '${name}'`);
      }
      // Others may write the node too, but not resize it under clients that were told
      // its size.
      await this.graph.setBackendPerms(backend, perm, [
        'consistent-read',
        'write',
        'write-unchanged',
      ]);
      if (config.bitmaps !== undefined && config.bitmaps.length > 0) {
        bitmaps = exportDirtyBitmaps(this.graph, config.nodeName, config.bitmaps, !config.writable);
      }
      if (config.iothread !== undefined) {
        iothreads = this.iothreadExport(config, name, backend, bitmaps !== undefined);
      }
      this.nbd.server.addExport({
        ...(iothreads !== undefined && { handoff: iothreads.handoff }),
        name,
        target: backend,
        writable: config.writable,
        allocationDepth: config.allocationDepth,
        ...(config.description !== undefined && { description: config.description }),
        ...(bitmaps !== undefined && { dirtyBitmaps: bitmaps.bitmaps }),
      });
    } catch (e) {
      iothreads?.release();
      bitmaps?.release();
      await backend.close();
      throw e;
    }
    this.exports.set(config.id, { config, name, backend, bitmaps, iothreads, shuttingDown: false });
    this.log.info(
      {
        event: 'export-add',
        id: config.id,
        name,
        node: config.nodeName,
        writable: config.writable,
      },
      'export added',
    );
  }

  /**
   * As QEMU's: 'safe' is refused while clients are connected (nothing changes); 'hard'
   * disconnects them. With no client attached the export is gone, and its event sent,
   * before this resolves; otherwise it resolves first, the export shows shutting-down
   * until its clients' requests are over, then the event.
   */
  async del(id: string, mode: 'safe' | 'hard'): Promise<void> {
    const entry = this.exports.get(id);
    const server = this.nbd?.server;
    if (!entry || !server) throw new QmpError('GenericError', `Export '${id}' is not found`);
    if (entry.shuttingDown) {
      throw new QmpError('GenericError', `Export '${id}' is already shutting down`);
    }
    const clients = server.exportStats(entry.name).connections;
    let removed!: (err: Error | null | undefined) => void;
    const gone = new Promise<void>((resolve) => {
      removed = (err) => {
        if (err) this.log.error({ event: 'export-del-failed', id, err }, 'export removal failed');
        resolve(err ? undefined : this.exportGone(id));
      };
    });
    try {
      // A safe removal with clients attached is refused as it starts (nothing changed).
      server.removeExport(entry.name, mode, { callback: (err) => removed(err) });
    } catch (e) {
      if ((e as NbdError).code === 'ERR_VMDISK_NBD_EXPORT_IN_USE') {
        throw new QmpError('GenericError', `export '${id}' still in use`);
      }
      throw e;
    }
    entry.shuttingDown = true;
    // Hard with clients: the reply first, the event when they are gone (as QEMU).
    if (mode === 'safe' || clients === 0) await gone;
  }

  /**
   * An export's `iothread`: its connections served in those workers. A list (multi-queue)
   * only for raw and file nodes (others refused as QEMU 7.2 refuses a list); an export
   * offering dirty bitmaps stays on the main thread (their contexts are its own).
   */
  private iothreadExport(
    config: NbdExportConfig,
    name: string,
    backend: BlockBackend,
    hasBitmaps: boolean,
  ): IoThreadExport | undefined {
    const it = config.iothread!;
    const driver = this.graph.node(config.nodeName).driver;
    if (it.list && driver !== 'raw' && driver !== 'file') {
      throw new QmpError('GenericError', "Invalid parameter type for 'iothread', expected: string");
    }
    const info = {
      name,
      description: config.description ?? '',
      size: backend.size(),
      writable: config.writable,
      allocationDepth: config.allocationDepth,
      blockSize: backend.blockSize,
    };
    const taken = this.iothreads.exportAdd(it.ids, info, backend, config.nodeName);
    if (!hasBitmaps) return taken;
    return { handoff: () => undefined, release: taken.release, fastReads: false };
  }

  info(id: string): BlockExportInfo | undefined {
    const e = this.exports.get(id);
    return (
      e && { type: 'nbd', id, 'node-name': e.config.nodeName, 'shutting-down': e.shuttingDown }
    );
  }

  async closeAll(): Promise<void> {
    if (this.nbd) await this.stop();
  }

  private async exportGone(id: string): Promise<void> {
    const entry = this.exports.get(id);
    if (!entry) return;
    this.exports.delete(id);
    entry.iothreads?.release();
    entry.bitmaps?.release();
    await entry.backend.close();
    this.log.info({ event: 'export-deleted', id }, 'export deleted');
    this.onDeleted(id);
  }

  /**
   * The server's TLS options from a tls-creds object of the graph's registry, read now:
   * as in QEMU, the object may be deleted later without touching the running server.
   */
  private serverTls(id: string): NbdServerTlsOptions {
    let creds: NbdTlsCreds;
    try {
      const types = ['tls-creds-psk', 'tls-creds-x509'] as const;
      creds = this.graph.objects.get(types, id, 'tls-creds');
    } catch {
      throw new QmpError('GenericError', `No TLS credentials with id '${id}'`);
    }
    return serverTlsOptions(creds, id);
  }
}

function listenOptions(addr: SocketAddress): { host: string; port: number } | { path: string } {
  if (addr.type === 'unix') return { path: addr.path };
  const port = Number(addr.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new VmDiskError('ERR_VMDISK_APP_BAD_OPTION', `'${addr.port}' is not a valid port`);
  }
  return { host: addr.host, port };
}
