// The daemon behind `vm-disk serve`: a block graph, exports of its nodes (NBD,
// vhost-user-blk, FUSE: one kind each, export-kind.ts), jobs, and QMP monitors, configured from qemu-storage-daemon's options and driven
// by QMP commands afterwards. It wires the packages together without their knowing each
// other: a BlockBackend of @vmdisk/block-graph is served as an ExportTarget by
// @vmdisk/nbd; jobs come from @vmdisk/ao.
import { unlinkSync, writeFileSync } from 'node:fs';
import { type JobEvent, JobRegistry, type JobStatusChangeEvent } from '@vmdisk/ao';
import { BlockGraph, type OptionSyntax } from '@vmdisk/block-graph';
import type { ListenAddress } from '@vmdisk/nbd';
import { ChardevRegistry } from './chardevs.ts';
import type { BlockExportInfo, BlockExportKind } from './export-kind.ts';
import { IoThreads } from './iothreads/iothreads.ts';
import { LazyExportKind } from './lazy-export-kind.ts';
import type { Logger } from './log.ts';
import { NbdExports } from './nbd-exports.ts';
import { configureNbdSocket } from './nbd-socket.ts';
import type {
  ExportConfig,
  FuseExportConfig,
  NbdServerConfig,
  ServeConfig,
  VhostUserBlkExportConfig,
} from './options/serve-options.ts';
import { namedBlockNodes } from './qmp/block-device-info.ts';
import type { DaemonControl } from './qmp/daemon-control.ts';
import { QmpError, QmpMonitor, type QmpVersion } from './qmp/monitor.ts';

export const QMP_VERSION: QmpVersion = {
  qemu: { major: 7, minor: 2, micro: 0 },
  package: 'vm-disk 0.1.0',
};

/** The daemon; its QMP commands are wired to it by the composition root (root.ts). */
export class Daemon implements DaemonControl {
  readonly graph = new BlockGraph({
    onEvent: (e) => this.monitor.emitEvent(e.event, { ...e.data }),
    configureSocket: configureNbdSocket,
  });
  readonly monitor: QmpMonitor;
  /** The chardevs: the monitors' sockets, and chardev-add's. */
  readonly chardevs: ChardevRegistry;
  readonly jobs: JobRegistry;
  /** The iothreads' workers (iothreads/). */
  readonly iothreads: IoThreads;
  private readonly nbd: NbdExports;
  private readonly exportKinds: {
    nbd: NbdExports;
    'vhost-user-blk': LazyExportKind<VhostUserBlkExportConfig>;
    fuse: LazyExportKind<FuseExportConfig>;
  };
  /** Every export's id and kind, oldest first. */
  private readonly exportIds = new Map<string, BlockExportKind>();
  private pidfile: string | undefined;
  private stopping: Promise<void> | undefined;
  private readonly stopped: Promise<void>;
  private markStopped!: () => void;

  readonly log: Logger;

  constructor(log: Logger) {
    this.log = log;
    this.monitor = new QmpMonitor(QMP_VERSION, log.child({ component: 'qmp' }));
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
    const deleted = (id: string) => this.exportDeleted(id);
    this.nbd = new NbdExports(this.graph, this.iothreads, log, deleted);
    this.exportKinds = {
      nbd: this.nbd,
      // Loaded by their first export (lazy-export-kind.ts).
      'vhost-user-blk': new LazyExportKind(async () => {
        const { VhostExports } = await import('./vhost-exports.ts');
        return new VhostExports(this.graph, log.child({ component: 'vhost-user' }), deleted);
      }),
      fuse: new LazyExportKind(async () => {
        const { FuseExports } = await import('./fuse-exports.ts');
        return new FuseExports(this.graph, log, deleted);
      }),
    };
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
  queryNamedBlockNodes(flat = false): Promise<Record<string, unknown>[]> {
    return namedBlockNodes(this.graph, flat);
  }

  async blockdevDel(nodeName: string): Promise<void> {
    await this.graph.del(nodeName);
    this.log.info({ event: 'blockdev-del', node: nodeName }, 'node removed');
  }

  get nbdAddress(): ListenAddress | undefined {
    return this.nbd.address;
  }

  /** Started and not stopping (the metrics endpoint's health). */
  get serving(): boolean {
    return this.stopping === undefined;
  }

  /** The NBD server and its exports (id, NBD name, node), for the metrics endpoint. */
  nbdExports(): ReturnType<NbdExports['list']> {
    return this.nbd.list();
  }

  nbdServerStart(config: NbdServerConfig): Promise<ListenAddress> {
    return this.nbd.start(config);
  }

  nbdServerStop(): Promise<void> {
    return this.nbd.stop();
  }

  /** block-export-add: ids are unique across kinds, checked first (QEMU's blk_exp_add). */
  async blockExportAdd(config: ExportConfig): Promise<void> {
    if (this.exportIds.has(config.id)) {
      throw new QmpError('GenericError', `Block export id '${config.id}' is already in use`);
    }
    const kind = this.exportKinds[config.type] as BlockExportKind;
    await kind.add(config);
    this.exportIds.set(config.id, kind);
  }

  /** block-export-del: what each mode does is the kind's (nbd-exports.ts, vhost, fuse). */
  async blockExportDel(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const kind = this.exportIds.get(id);
    if (!kind) throw new QmpError('GenericError', `Export '${id}' is not found`);
    await kind.del(id, mode);
  }

  /** query-block-exports: newest first, as qemu-storage-daemon lists them. */
  queryBlockExports(): BlockExportInfo[] {
    return [...this.exportIds].reverse().flatMap(([id, kind]) => kind.info(id) ?? []);
  }

  private exportDeleted(id: string): void {
    this.exportIds.delete(id);
    this.monitor.emitEvent('BLOCK_EXPORT_DELETED', { id });
  }

  async closeExports(): Promise<void> {
    const kinds = this.exportKinds;
    await kinds['vhost-user-blk'].closeAll();
    await kinds.fuse.closeAll();
    await kinds.nbd.closeAll();
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
