// The daemon's iothreads: one worker per `iothread` object of the graph's registry (the
// object holds the settings and the users; this holds the threads), and the exports that
// name them with `iothread`.
import type { BlockBackend, BlockGraph } from '@vmdisk/block-graph';
import type { HandedOff, TransmissionOffer } from '@vmdisk/nbd';
import type { Logger } from '../log.ts';
import { QmpError } from '../qmp/monitor.ts';
import { FastReads } from './fast-reads.ts';
import { IoThread } from './iothread.ts';
import type { WorkerExport } from './messages.ts';

/** An export served in iothreads: what its removal undoes. */
export interface IoThreadExport {
  /** The NBD server's handoff for the export's connections. */
  handoff: (offer: TransmissionOffer) => HandedOff | undefined;
  /** The export is gone: the workers forget it, the iothreads may be deleted. */
  release(): void;
  /** Its READs are served from the file by the workers now (fast-reads.ts). */
  readonly fastReads: boolean;
}

export class IoThreads {
  private readonly threads = new Map<string, IoThread>();
  /** The fast path of each export served in iothreads, by NBD export name. */
  private readonly fast = new Map<string, FastReads>();
  private readonly graph: BlockGraph;
  private readonly log: Logger;

  constructor(graph: BlockGraph, log: Logger) {
    this.graph = graph;
    this.log = log;
  }

  /** An iothread object was added: its worker starts. */
  started(id: string): void {
    const t = new IoThread(id, this.log);
    this.threads.set(id, t);
    this.log.info({ event: 'iothread-started', id, threadId: t.threadId }, 'iothread started');
  }

  /** An iothread object was deleted (the registry refuses one in use): its worker ends. */
  async stopped(id: string): Promise<void> {
    const t = this.threads.get(id);
    this.threads.delete(id);
    await t?.terminate();
  }

  get(id: string): IoThread | undefined {
    return this.threads.get(id);
  }

  /**
   * Serves an export's connections in `ids` (round-robin over several: multi-queue),
   * QEMU's `iothread` of block-export-add. An unknown iothread is refused in QEMU's words;
   * the iothreads are in use until release().
   */
  exportAdd(
    ids: readonly string[],
    info: WorkerExport,
    backend: BlockBackend,
    nodeName: string,
  ): IoThreadExport {
    const objects = this.graph.objects;
    for (const id of ids) {
      if (objects.typeOf(id) !== 'iothread' || !this.threads.has(id)) {
        throw new QmpError('GenericError', `iothread "${id}" not found`);
      }
    }
    const threads = ids.map((id) => {
      objects.use('iothread', id, 'iothread');
      const t = this.threads.get(id)!;
      t.exportAdd(info, backend);
      return t;
    });
    const fast = new FastReads(this.graph, backend, nodeName, info.name, threads);
    this.fast.set(info.name, fast);
    let next = 0;
    return {
      get fastReads() {
        return fast.active;
      },
      handoff: (offer) => {
        // Round-robin over those alive; with none, the main thread serves it.
        for (let i = 0; i < threads.length; i++) {
          const t = threads[(next + i) % threads.length]!;
          if (!t.alive) continue;
          next = (next + i + 1) % threads.length;
          return t.adopt(offer, info.name);
        }
        return undefined;
      },
      release: () => {
        fast.stop();
        if (this.fast.get(info.name) === fast) this.fast.delete(info.name);
        for (const t of threads) {
          t.exportDel(info.name);
          objects.release(t.id);
        }
      },
    };
  }

  /** Whether the workers read NBD export `name`'s file themselves now (fast-reads.ts). */
  fastReads(name: string): boolean {
    return this.fast.get(name)?.active ?? false;
  }

  /** Ends every worker (the daemon stops; the exports are gone already). */
  async close(): Promise<void> {
    const all = [...this.threads.values()];
    this.threads.clear();
    await Promise.all(all.map((t) => t.terminate()));
  }
}
