// One iothread (QEMU's `--object iothread,id=`): a worker thread with its own event loop
// and NBD server, serving the connections of exports named with `iothread=`. The main
// thread hands each connection off after its handshake (the socket's fd, duplicated) and
// runs the requests the worker forwards through the export's BlockBackend.
import { Worker } from 'node:worker_threads';
import type { BlockBackend } from '@vmdisk/block-graph';
import { dupFd } from '@vmdisk/engine';
import type { HandedOff, TransmissionOffer } from '@vmdisk/nbd';
import type { Logger } from '../log.ts';
import { runForwarded, toForwardedError } from './forward-serve.ts';
import type { FastFile, FromWorker, ToWorker, WorkerExport } from './messages.ts';

/** The worker's entry: the bundled file next to the daemon's, or the source under tests. */
function workerUrl(): URL {
  return import.meta.url.endsWith('.ts')
    ? new URL('./worker.ts', import.meta.url)
    : new URL('./iothreads/worker.js', import.meta.url);
}

export class IoThread {
  readonly id: string;
  /** The thread (tests end it to see a failure handled). */
  readonly worker: Worker;
  private readonly log: Logger;
  private readonly backends = new Map<string, BlockBackend>();
  /** Connections handed off and not over: their `done`. */
  private readonly handed = new Map<number, () => void>();
  /** fast-off sent, its answer awaited, by export name. */
  private readonly fastOffs = new Map<string, (() => void)[]>();
  private failed: Error | undefined;
  private terminating = false;

  constructor(id: string, log: Logger) {
    this.id = id;
    this.log = log;
    this.worker = new Worker(workerUrl(), { name: `iothread ${id}` });
    this.worker.on('message', (m: FromWorker) => this.onMessage(m));
    this.worker.on('error', (err) => this.fail(err));
    this.worker.on('exit', (code) => {
      if (!this.terminating) this.fail(new Error(`the worker exited (code ${code})`));
    });
    // The daemon's life is its listeners' and monitors': an idle iothread does not hold it.
    this.worker.unref();
  }

  /** The worker's thread id (for logs and tests). */
  get threadId(): number {
    return this.worker.threadId;
  }

  /** Connections handed to the worker and not over. */
  get connections(): number {
    return this.handed.size;
  }

  /** Serving: not failed, not terminated. */
  get alive(): boolean {
    return this.failed === undefined && !this.terminating;
  }

  /** The worker serves export `info.name` from now on, forwarding its I/O to `backend`. */
  exportAdd(info: WorkerExport, backend: BlockBackend): void {
    this.backends.set(info.name, backend);
    this.post({ t: 'export-add', export: info });
  }

  exportDel(name: string): void {
    this.backends.delete(name);
    this.post({ t: 'export-del', name });
  }

  /**
   * Takes a connection of export `name` (the NBD server's handoff): its fd is duplicated
   * for the worker and the main thread's socket closed. Undefined (served on the main
   * thread) when the iothread has failed.
   */
  adopt(offer: TransmissionOffer, name: string): HandedOff | undefined {
    if (!this.alive) return undefined;
    const handle = (offer.socket as unknown as { _handle?: { fd?: number } })._handle;
    const fd = handle?.fd;
    if (fd === undefined || fd < 0) return undefined;
    const dup = dupFd(fd);
    offer.socket.destroy();
    this.handed.set(offer.id, offer.done);
    this.post({ t: 'adopt', conn: offer.id, fd: dup, name, state: offer.state });
    return { destroy: () => this.post({ t: 'destroy', conn: offer.id }) };
  }

  /** The worker may read export `name`'s file itself (fast-reads.ts holds the lease). */
  fastOn(name: string, file: FastFile): void {
    this.post({ t: 'fast-on', name, file });
  }

  /** Resolves once the worker reads export `name`'s file no more (or is gone). */
  fastOff(name: string): Promise<void> {
    if (!this.alive) return Promise.resolve();
    return new Promise((resolve) => {
      const list = this.fastOffs.get(name) ?? [];
      list.push(resolve);
      this.fastOffs.set(name, list);
      this.post({ t: 'fast-off', name });
    });
  }

  async terminate(): Promise<void> {
    this.terminating = true;
    await this.worker.terminate();
    this.allGone();
  }

  private post(m: ToWorker): void {
    if (this.alive) this.worker.postMessage(m);
  }

  private onMessage(m: FromWorker): void {
    switch (m.t) {
      case 'io': {
        const backend = this.backends.get(m.name);
        const reply = (r: Omit<Extract<ToWorker, { t: 'reply' }>, 't' | 'id'>) =>
          this.post({ t: 'reply', id: m.id, ...r });
        if (backend === undefined) {
          reply({ error: { errnoName: 'EIO', message: `export '${m.name}' is gone` } });
          return;
        }
        runForwarded(backend, m.req).then(
          (extents) => reply(extents !== undefined ? { extents } : {}),
          (err: unknown) => reply({ error: toForwardedError(err) }),
        );
        return;
      }
      case 'closed': {
        const done = this.handed.get(m.conn);
        this.handed.delete(m.conn);
        done?.();
        return;
      }
      case 'fast-off-done': {
        const list = this.fastOffs.get(m.name);
        const resolve = list?.shift();
        if (list?.length === 0) this.fastOffs.delete(m.name);
        resolve?.();
        return;
      }
      case 'log':
        this.log[m.level]({ ...m.data, iothread: this.id }, m.msg);
        return;
    }
  }

  /**
   * The worker failed (an uncaught error, or it exited): its connections are gone (their
   * exports see them leave), new ones are served on the main thread; the daemon goes on.
   */
  private fail(err: Error): void {
    if (this.failed !== undefined || this.terminating) return;
    this.failed = err;
    this.log.error(
      { event: 'iothread-failed', id: this.id, error: err.message },
      `iothread '${this.id}' failed: ${err.message}; its connections are closed, new ones are served on the main thread`,
    );
    this.allGone();
  }

  private allGone(): void {
    const handed = [...this.handed.values()];
    this.handed.clear();
    for (const done of handed) done();
    // A worker gone reads nothing: a drain waiting for it goes on.
    const offs = [...this.fastOffs.values()].flat();
    this.fastOffs.clear();
    for (const resolve of offs) resolve();
  }
}
