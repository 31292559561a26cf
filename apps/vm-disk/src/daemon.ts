// The daemon behind `vm-disk serve`: a block graph, an NBD server with exports of its
// nodes, jobs, and QMP monitors, configured from qemu-storage-daemon's options and driven
// by QMP commands afterwards. It wires the packages together without their knowing each
// other: a BlockBackend of @vmdisk/block-graph is served as an ExportTarget by
// @vmdisk/nbd; jobs come from @vmdisk/ao.
import { unlinkSync, writeFileSync } from 'node:fs';
import { type JobEvent, JobRegistry, type JobStatusChangeEvent } from '@vmdisk/ao';
import {
  type BlockBackend,
  BlockGraph,
  type ExportedBitmaps,
  exportDirtyBitmaps,
  type NbdTlsCreds,
  type OptionSyntax,
} from '@vmdisk/block-graph';
import {
  type ListenAddress,
  type NbdError,
  NbdServer,
  type NbdServerTlsOptions,
} from '@vmdisk/nbd';
import { ChardevRegistry } from './chardevs.ts';
import { VmDiskError } from './errors.ts';
import { FuseExports } from './fuse-exports.ts';
import { type IoThreadExport, IoThreads } from './iothreads/iothreads.ts';
import type { Logger } from './log.ts';
import type {
  ExportConfig,
  NbdExportConfig,
  NbdServerConfig,
  ServeConfig,
  SocketAddress,
} from './options/serve-options.ts';
import { namedBlockNodes } from './qmp/block-device-info.ts';
import type { DaemonControl } from './qmp/daemon-control.ts';
import { QmpError, QmpMonitor, type QmpVersion } from './qmp/monitor.ts';
import { serverTlsOptions } from './tls-creds.ts';
import { VhostExports } from './vhost-exports.ts';

export const QMP_VERSION: QmpVersion = {
  qemu: { major: 7, minor: 2, micro: 0 },
  package: 'vm-disk 0.1.0',
};

interface ExportEntry {
  config: NbdExportConfig;
  name: string;
  backend: BlockBackend;
  /** The dirty bitmaps it offers (busy until the export is gone). */
  bitmaps: ExportedBitmaps | undefined;
  /** Served in iothreads (`iothread`). */
  iothreads: IoThreadExport | undefined;
  shuttingDown: boolean;
}

/** The daemon; its QMP commands are wired to it by the composition root (root.ts). */
export class Daemon implements DaemonControl {
  readonly graph = new BlockGraph({
    onEvent: (e) => this.monitor.emitEvent(e.event, { ...e.data }),
  });
  readonly monitor: QmpMonitor;
  /** The chardevs: the monitors' sockets, and chardev-add's. */
  readonly chardevs: ChardevRegistry;
  readonly jobs: JobRegistry;
  /** The iothreads' workers (iothreads/). */
  readonly iothreads: IoThreads;
  private nbd: { server: NbdServer; address: ListenAddress } | undefined;
  private readonly exports = new Map<string, ExportEntry>();
  private readonly vhostExports: VhostExports;
  private readonly fuse: FuseExports;
  private pidfile: string | undefined;
  private stopping: Promise<void> | undefined;
  private readonly stopped: Promise<void>;
  private markStopped!: () => void;

  readonly log: Logger;

  constructor(log: Logger) {
    this.log = log;
    this.monitor = new QmpMonitor(QMP_VERSION, log.child({ component: 'qmp' }));
    this.vhostExports = new VhostExports(this.graph, log.child({ component: 'vhost-user' }));
    this.chardevs = new ChardevRegistry(this.monitor);
    this.iothreads = new IoThreads(this.graph, log.child({ component: 'iothread' }));
    this.jobs = new JobRegistry({
      events: {
        push: (e: JobStatusChangeEvent | JobEvent) => {
          if (e.event === 'JOB_STATUS_CHANGE') {
            log.info({ event: 'job-status', id: e.data.id, status: e.data.status }, 'job status');
          } else log.info({ event: 'job-event', name: e.event, ...e.data }, 'job event');
          this.monitor.emitEvent(e.event, { ...e.data });
        },
      },
    });
    this.fuse = new FuseExports(this.graph, log, (id) =>
      this.monitor.emitEvent('BLOCK_EXPORT_DELETED', { id }),
    );
    this.stopped = new Promise((resolve) => {
      this.markStopped = resolve;
    });
  }

  /** Configures the daemon from checked options; on any failure, stops it and throws. */
  async start(config: ServeConfig): Promise<void> {
    try {
      for (const o of config.objects) await this.objectAdd(o.options, o.syntax);
      for (const b of config.blockdevs) await this.blockdevAdd(b.options, b.syntax);
      if (config.nbdServer) await this.nbdServerStart(config.nbdServer);
      for (const e of config.exports) await this.blockExportAdd(e);
      for (const m of config.monitors) {
        const addr = { type: 'unix' as const, path: m.chardev.path };
        await this.chardevs.add(m.chardev.id, { type: 'socket', addr }, { pretty: m.pretty });
        this.log.info(
          { event: 'monitor-listening', path: m.chardev.path },
          'QMP monitor listening',
        );
      }
      if (config.pidfile) {
        writeFileSync(config.pidfile, `${process.pid}\n`);
        this.pidfile = config.pidfile;
      }
    } catch (e) {
      await this.stop();
      throw e;
    }
  }

  /** object-add / --object: an object of the graph's registry (drivers and NBD use it). */
  async objectAdd(options: Record<string, unknown>, syntax: OptionSyntax): Promise<void> {
    await this.graph.addObject(options, { syntax });
    if (options['qom-type'] === 'iothread') this.iothreads.started(String(options.id));
    this.log.info(
      { event: 'object-add', id: options.id, type: options['qom-type'] },
      'object added',
    );
  }

  async objectDel(id: string): Promise<void> {
    const iothread = this.graph.objects.typeOf(id) === 'iothread';
    await this.graph.delObject(id);
    if (iothread) await this.iothreads.stopped(id);
    this.log.info({ event: 'object-del', id }, 'object deleted');
  }

  /** blockdev-add (QMP, typed) or --blockdev (JSON, or keyval strings); names the root. */
  async blockdevAdd(options: Record<string, unknown>, syntax: OptionSyntax): Promise<void> {
    const node = await this.graph.add(options, { syntax, requireNodeName: true });
    this.log.info({ event: 'blockdev-add', node: node.name, driver: options.driver }, 'node added');
  }

  /** query-named-block-nodes, in QEMU's BlockDeviceInfo shape (qmp/block-device-info.ts). */
  queryNamedBlockNodes(): Promise<Record<string, unknown>[]> {
    return namedBlockNodes(this.graph);
  }

  async blockdevDel(nodeName: string): Promise<void> {
    await this.graph.del(nodeName);
    this.log.info({ event: 'blockdev-del', node: nodeName }, 'node removed');
  }

  /**
   * The NBD server's TLS options from a tls-creds object of the graph's registry, read
   * now: as in QEMU, the object may be deleted later without touching the running server.
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

  get nbdAddress(): ListenAddress | undefined {
    return this.nbd?.address;
  }

  /** Started and not stopping (the metrics endpoint's health). */
  get serving(): boolean {
    return this.stopping === undefined;
  }

  /** The NBD server and its exports (id, NBD name, node), for the metrics endpoint. */
  nbdExports(): {
    server: NbdServer | undefined;
    exports: { id: string; name: string; node: string }[];
  } {
    const exports = [...this.exports.values()].map((e) => ({
      id: e.config.id,
      name: e.name,
      node: e.config.nodeName,
    }));
    return { server: this.nbd?.server, exports };
  }

  async nbdServerStart(config: NbdServerConfig): Promise<ListenAddress> {
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

  async nbdServerStop(): Promise<void> {
    const nbd = this.nbd;
    if (!nbd) throw new QmpError('GenericError', 'NBD server not running');
    this.nbd = undefined;
    const ids = [...this.exports.keys()];
    await nbd.server.close();
    await Promise.all(ids.map((id) => this.exportGone(id)));
    this.log.info({ event: 'nbd-stopped' }, 'NBD server stopped');
  }

  async blockExportAdd(config: ExportConfig): Promise<void> {
    const idTaken =
      this.exports.has(config.id) || this.vhostExports.has(config.id) || this.fuse.has(config.id);
    if (idTaken) {
      throw new QmpError('GenericError', `Block export id '${config.id}' is already in use`);
    }
    if (config.type === 'vhost-user-blk') return this.vhostExports.add(config);
    if (config.type === 'fuse') return this.fuse.add(config);
    if (!this.nbd) throw new QmpError('GenericError', 'NBD server not running');
    const name = config.name ?? config.nodeName;
    if ([...this.exports.values()].some((e) => e.name === name)) {
      throw new QmpError('GenericError', `NBD server already has export named '${name}'`);
    }
    const backend = await this.graph.createBackend(config.nodeName, {
      name: `export:${config.id}`,
      write: config.writable,
      // As QEMU's NBD export: others may write the node too, but not resize it under
      // clients that were told its size (nbd_export_create unshares resize).
      shared: ['consistent-read', 'write', 'write-unchanged'],
    });
    let bitmaps: ExportedBitmaps | undefined;
    let iothreads: IoThreadExport | undefined;
    try {
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
    this.exports.set(config.id, {
      config,
      name,
      backend,
      bitmaps,
      iothreads,
      shuttingDown: false,
    });
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
   * block-export-del, as QEMU's: 'safe' is refused while clients are connected (nothing
   * changes); 'hard' disconnects them. With no client attached the export is gone, and
   * BLOCK_EXPORT_DELETED sent, before the reply; otherwise the reply comes first, the
   * export shows shutting-down until its clients' requests are over, then the event.
   */
  async blockExportDel(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    if (this.vhostExports.has(id)) {
      // As qemu-storage-daemon: the front-end is disconnected in either mode, the export
      // gone (its event sent) before the reply.
      await this.vhostExports.del(id);
      this.monitor.emitEvent('BLOCK_EXPORT_DELETED', { id });
      return;
    }
    if (this.fuse.has(id)) return this.fuse.del(id);
    const entry = this.exports.get(id);
    if (!entry || !this.nbd) throw new QmpError('GenericError', `Export '${id}' is not found`);
    if (entry.shuttingDown)
      throw new QmpError('GenericError', `Export '${id}' is already shutting down`);
    const server = this.nbd.server;
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

  queryBlockExports(): {
    type: string;
    id: string;
    'node-name': string;
    'shutting-down': boolean;
  }[] {
    const nbd = [...this.exports.values()].map((e) => ({
      type: 'nbd',
      id: e.config.id,
      'node-name': e.config.nodeName,
      'shutting-down': e.shuttingDown,
    }));
    return [...nbd, ...this.vhostExports.query(), ...this.fuse.query()];
  }

  private async exportGone(id: string): Promise<void> {
    const entry = this.exports.get(id);
    if (!entry) return;
    this.exports.delete(id);
    entry.iothreads?.release();
    entry.bitmaps?.release();
    await entry.backend.close();
    this.log.info({ event: 'export-deleted', id }, 'export deleted');
    this.monitor.emitEvent('BLOCK_EXPORT_DELETED', { id });
  }

  async closeExports(): Promise<void> {
    for (const id of this.vhostExports.ids()) await this.blockExportDel(id);
    await this.fuse.closeAll();
    if (this.nbd) await this.nbdServerStop();
  }

  /** Resolves when the daemon has stopped (quit, a signal, or stop()). */
  wait(): Promise<void> {
    return this.stopped;
  }

  /** Stops cleanly: exports removed, nodes closed clean (qcow2 written back), monitors closed. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info({ event: 'stopping' }, 'stopping');
      await this.closeExports();
      for (const job of this.jobs.jobs) {
        if (job.status !== 'concluded' && job.status !== 'null') job.cancel(true);
      }
      // A node failing to close (EIO writing qcow2 metadata back) is reported, as QEMU
      // does; the daemon still stops cleanly.
      await this.graph.close().catch((err: unknown) => {
        this.log.error({ event: 'close-failed', err }, 'closing the block graph failed');
      });
      await this.iothreads.close();
      await this.monitor.close();
      await this.chardevs.close();
      if (this.pidfile) unlinkSync(this.pidfile);
      this.log.info({ event: 'stopped' }, 'stopped');
      this.markStopped();
    })();
    return this.stopping;
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
