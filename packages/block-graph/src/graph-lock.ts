// The graph lock: every request holds the read side for its whole duration; a graph change
// takes the write side, which first drains (waits until no request is in flight and admits
// none until the change is done). Drained sections nest. Graph changes are serialised
// among themselves.
//
// Never begin a drained section or a graph change from inside a request (while holding the
// read side): it would wait for itself.

import { runAo } from '@vmdisk/ao';

/**
 * Someone outside the graph whose I/O must stop while the graph changes (e.g. another
 * thread reading a node's file itself, holding the read side as one long request).
 */
export interface DrainObserver {
  /** A drained section began: stop, and release the read side held for that I/O. */
  begin(): void;
  /** The last drained section ended (requests are admitted again). */
  end(): void;
}

/**
 * The nodes a drained section is over, as QEMU 7.2 drains them (what its parents see):
 * - subtree: each node, everything below it, and their parents (bdrv_subtree_drained_begin:
 *   blockdev-reopen);
 * - nodes: each node and its parents, up to the roots (bdrv_drained_begin: a BlockBackend
 *   letting go of its node, a snapshot's node);
 * - 'all': every node (bdrv_drain_all_begin: the start of a transaction).
 * The graph lock itself drains every request whatever the scope: the scope says which
 * observers (block jobs) stop for it.
 */
export type DrainScope =
  | { readonly subtree: readonly string[] }
  | { readonly nodes: readonly string[] }
  | 'all';

/** An observer stopped for a drained section: what to wait for, and how it goes on. */
export interface DrainStop {
  quiet: Promise<void>;
  end(): void;
}

/**
 * Someone that stops while some nodes are drained (a block job over them, QEMU's
 * child_job parent): told the nodes a graph change drains, before it waits for requests.
 */
export interface NodeDrainObserver {
  /**
   * A drained section over `scope` begins: undefined when it is none of the observer's
   * business; else what the change waits for (the observer quiet) and what ends it.
   */
  begin(scope: DrainScope): DrainStop | undefined;
}

export class GraphLock {
  private readers = 0;
  private admissions = 0;
  private drained = 0;
  private admit: (() => void)[] = [];
  private idle: (() => void)[] = [];
  private writer: Promise<void> = Promise.resolve();
  /** Called when a drained section begins (filters let queued requests go). */
  onDrainBegin: (() => void) | undefined;
  private readonly observers = new Set<DrainObserver>();
  private readonly nodeObservers = new Set<NodeDrainObserver>();
  /** Woken when a graph change queues behind the one running (see write). */
  private queued: (() => void)[] = [];

  /** Tells `o` of drained sections from now on, until the function returned is called. */
  observeDrain(o: DrainObserver): () => void {
    this.observers.add(o);
    return () => this.observers.delete(o);
  }

  /** Tells `o` of the nodes graph changes drain, until the function returned is called. */
  observeNodeDrain(o: NodeDrainObserver): () => void {
    this.nodeObservers.add(o);
    return () => this.nodeObservers.delete(o);
  }

  /** Requests holding the read side now. */
  get inFlight(): number {
    return this.readers;
  }

  /** How deeply drained sections are nested now. */
  get drainDepth(): number {
    return this.drained;
  }

  /** The users' requests admitted so far (not block jobs'): jobs watch it to give way. */
  get userAdmissions(): number {
    return this.admissions;
  }

  /** Takes the read side at once if no drained section is active; true when taken. */
  tryRead(): boolean {
    if (!this.tryReadForJob()) return false;
    this.admissions++;
    return true;
  }

  /** tryRead for a block job's own request: not counted among the users'. */
  tryReadForJob(): boolean {
    if (this.drained !== 0) return false;
    this.readers++;
    return true;
  }

  /** Takes the read side, waiting for the end of drained sections. */
  async read(): Promise<void> {
    while (this.drained !== 0) await new Promise<void>((resolve) => this.admit.push(resolve));
    this.readers++;
    this.admissions++;
  }

  /** Resolves when no drained section is active (read would be admitted; nothing taken). */
  admitted(): Promise<void> {
    if (this.drained === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.admit.push(resolve));
  }

  releaseRead(): void {
    this.readers--;
    if (this.readers === 0 && this.idle.length > 0) {
      const idle = this.idle;
      this.idle = [];
      for (const w of idle) w();
    }
  }

  /**
   * Begins a drained section: admits no new request; resolves when none is in flight. The
   * wait is an asynchronous operation of @vmdisk/ao ('block-graph.drain'), so that a drain
   * that never ends shows in liveAos() with the stack that began it.
   */
  drainedBegin(): Promise<void> {
    this.drained++;
    if (this.drained === 1) {
      this.onDrainBegin?.();
      for (const o of [...this.observers]) o.begin();
    }
    if (this.readers === 0) return Promise.resolve();
    return runAo('block-graph.drain', undefined, async () => {
      while (this.readers !== 0) await new Promise<void>((resolve) => this.idle.push(resolve));
    });
  }

  /** Ends a drained section; the outermost end admits the waiting requests. */
  drainedEnd(): void {
    if (this.drained === 0) throw new Error('drainedEnd without drainedBegin');
    this.drained--;
    if (this.drained === 0) {
      const admit = this.admit;
      this.admit = [];
      for (const w of admit) w();
      for (const o of [...this.observers]) if (this.drained === 0) o.end();
    }
  }

  /**
   * Runs a graph change under the write side (drained, one change at a time). `scope`: the
   * nodes QEMU drains for it: the observers over them (block jobs) stop first (block jobs
   * pause, their events before the reply), and go on after the change.
   */
  async write<T>(change: () => Promise<T> | T, scope?: DrainScope): Promise<T> {
    const previous = this.writer;
    let done!: () => void;
    this.writer = new Promise<void>((resolve) => {
      done = resolve;
    });
    const queued = this.queued.splice(0);
    for (const w of queued) w();
    await previous;
    try {
      const end = await this.drainedSection(scope);
      try {
        return await change();
      } finally {
        end();
      }
    } finally {
      done();
    }
  }

  /**
   * A drained section over `scope` that is no graph change of its own (QEMU's blk_drain,
   * bdrv_drain_all): the observers over it stop, no request is in flight; call the
   * function returned to end it. Graph changes may run inside it (a snapshot's node
   * stays drained while the overlay goes on top); it does not take the write side.
   */
  async drainedSection(scope?: DrainScope): Promise<() => void> {
    const stopped: DrainStop[] = [];
    for (const o of scope ? [...this.nodeObservers] : []) {
      const s = o.begin(scope!);
      if (s) stopped.push(s);
    }
    const end = (): void => {
      this.drainedEnd();
      for (const s of stopped) s.end();
    };
    try {
      await this.drainedBegin();
      if (stopped.length > 0) await this.quiet(stopped.map((s) => s.quiet));
    } catch (err) {
      end();
      throw err;
    }
    return end;
  }

  /**
   * Waits until the observers are quiet, or until another graph change queues: it may be
   * what one of them waits for (a job resizing its target), which must not deadlock.
   */
  private quiet(all: Promise<void>[]): Promise<unknown> {
    return Promise.race([
      Promise.all(all),
      new Promise<void>((resolve) => this.queued.push(resolve)),
    ]);
  }
}
