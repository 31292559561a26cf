// Block jobs over the graph (QEMU's blockjob.c): an @vmdisk/ao Job plus what a block job
// owns. Nodes it uses, with the permissions QEMU's jobs take (block_job_add_bdrv: one
// backend per node), busy for other jobs and graph changes, and the backing links it will
// change frozen; the rate limit (`speed`); the error policy (on-error); BlockJobInfo for
// query-block-jobs; and the BLOCK_JOB_* events, queued with JOB_STATUS_CHANGE so that they
// come in QEMU's order.
import type { Job, JobRegistry, JobTxn } from '@vmdisk/ao';
import type { BlockBackend } from '../backend.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { DrainScope, DrainStop } from '../graph-lock.ts';
import type { BlockNode } from '../node.ts';
import type { PermissionName } from '../permissions.ts';
import { GiveWay } from './give-way.ts';
import {
  blockNodes,
  checkNotBusy,
  freezeLinks,
  unblockNodes,
  unfreezeLinks,
} from './op-blockers.ts';
import { RateLimit } from './ratelimit.ts';

export type BlockdevOnError = 'report' | 'ignore' | 'stop' | 'enospc';
export type BlockJobIoStatus = 'ok' | 'failed' | 'nospace';

/** The arguments every block job command takes (QEMU's names in the QMP layer). */
export interface BlockJobCommonOptions {
  /** The job ID (QEMU: defaults to the device name; a node has none, so it is required). */
  jobId?: string;
  speed?: number;
  onError?: BlockdevOnError;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
}

/** One entry of query-block-jobs (QEMU's BlockJobInfo). */
export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  'io-status': BlockJobIoStatus;
  ready: boolean;
  status: string;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

/** What a kind of block job does, over its BlockJob. */
export interface BlockJobBody {
  run(bj: BlockJob): Promise<void>;
  /** The graph change of a successful job (QEMU .prepare), drained, under the graph lock. */
  prepare?(bj: BlockJob): Promise<void>;
  /** Undoes the job's graph changes when it failed or was cancelled (QEMU .abort). */
  abort?(bj: BlockJob): Promise<void>;
  /** block-job-complete of a ready job (mirror, active commit). */
  complete?(bj: BlockJob): void;
  /** Whether a cancel is forced (QEMU .cancel: a ready mirror cancels softly). */
  cancel?(bj: BlockJob, force: boolean): boolean;
  /** Called right after the job started, before its body runs (backup pauses it there). */
  started?(bj: BlockJob): void;
}

const jobsOf = new WeakMap<BlockGraph, Map<string, BlockJob>>();

/** The block jobs of a graph, in creation order (query-block-jobs). */
export function blockJobs(graph: BlockGraph): BlockJob[] {
  return [...(jobsOf.get(graph)?.values() ?? [])];
}

/** The block job of that ID, or undefined (QEMU find_block_job). */
export function findBlockJob(graph: BlockGraph, id: string): BlockJob | undefined {
  return jobsOf.get(graph)?.get(id);
}

const STRERROR: Record<string, string> = {
  EIO: 'Input/output error',
  ENOSPC: 'No space left on device',
  EPERM: 'Operation not permitted',
  EACCES: 'Permission denied',
  EINVAL: 'Invalid argument',
  ENOTSUP: 'Not supported',
  ECANCELED: 'Operation canceled',
};

/** An error as QEMU words a job's failure (strerror of its errno). */
function errorText(err: Error): string {
  const errno = (err as { errnoName?: string }).errnoName;
  return (errno !== undefined && STRERROR[errno]) || err.message;
}

function checkSpeed(speed: number | undefined): void {
  if (speed !== undefined && speed < 0) {
    throw new BlockError(BlockErrorCode.BAD_JOB, "Parameter 'speed' expects a non-negative value");
  }
}

export class BlockJob {
  readonly graph: BlockGraph;
  readonly type: string;
  readonly id: string;
  readonly onError: BlockdevOnError;
  iostatus: BlockJobIoStatus = 'ok';
  #job: Job | undefined;
  readonly #limit = new RateLimit();
  readonly #giveWay: GiveWay;
  /** The body's requests holding the read side now, and who waits for none. */
  #ioInFlight = 0;
  #ioIdle: (() => void)[] = [];
  readonly #backends: BlockBackend[] = [];
  readonly #busy: string[] = [];
  readonly #frozen: [string, string][] = [];
  readonly #onRelease: (() => Promise<void>)[] = [];
  #released = false;
  /** Whether QEMU would have created the job by now (events on an early failure). */
  #created = false;
  /** Started (begin): only a started job sends BLOCK_JOB_COMPLETED / _CANCELLED. */
  #begun = false;
  #started: ((bj: BlockJob) => void) | undefined;
  /** Stops telling the job of drained nodes (set while it uses nodes). */
  #unobserve: (() => void) | undefined;
  /** Requests of the body waiting for the read side, behind a drained section: quiet. */
  #waitingRead = 0;
  #onWaitingRead: (() => void)[] = [];
  /**
   * The requests waiting for the read side: woken with true when a drained section over the
   * job begins, with false when requests are admitted again (one subscription to the lock's
   * admitted() for all of them while one is taken, not one per wake).
   */
  #wakeWaiting = new Set<(drained: boolean) => void>();
  #admittedTaken = false;
  /** Drained sections over the job's nodes now. */
  #drainsOverMe = 0;
  /** One of the body's requests is passing a pause point before it waits for the read side. */
  #pausingInIo = false;

  private constructor(graph: BlockGraph, type: string, id: string, onError: BlockdevOnError) {
    this.graph = graph;
    this.type = type;
    this.id = id;
    this.onError = onError;
    this.#giveWay = new GiveWay(graph.lock);
  }

  /** Creates and starts a block job (QEMU block_job_create + job_start): see create. */
  static async start(
    graph: BlockGraph,
    jobs: JobRegistry,
    type: string,
    options: BlockJobCommonOptions,
    setup: (bj: BlockJob) => Promise<void>,
    body: BlockJobBody,
  ): Promise<BlockJob> {
    const bj = await BlockJob.create(graph, jobs, type, options, setup, body);
    bj.begin();
    return bj;
  }

  /**
   * Creates a block job in 'created' (QEMU block_job_create), in the job transaction `txn`
   * if given: `setup` takes the nodes (addNode) and freezes links; when it or the job's
   * creation fails, everything taken is given back and nothing is left. `begin` starts it.
   */
  static async create(
    graph: BlockGraph,
    jobs: JobRegistry,
    type: string,
    options: BlockJobCommonOptions,
    setup: (bj: BlockJob) => Promise<void>,
    body: BlockJobBody,
    txn?: JobTxn,
  ): Promise<BlockJob> {
    const id = options.jobId;
    if (id === undefined) {
      throw new BlockError(BlockErrorCode.BAD_JOB, "Invalid job ID ''");
    }
    if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) {
      throw new BlockError(BlockErrorCode.BAD_JOB, `Invalid job ID '${id}'`);
    }
    if (jobs.find(id)) {
      throw new BlockError(BlockErrorCode.BAD_JOB, `Job ID '${id}' already in use`);
    }
    const bj = new BlockJob(graph, type, id, options.onError ?? 'report');
    try {
      await setup(bj);
      bj.#created = true;
      checkSpeed(options.speed);
    } catch (err) {
      await bj.#release();
      // Past QEMU's job_create (it took its first node, block_job_add_bdrv), a failure is
      // job_early_fail: the job was created and goes to null.
      if (bj.#created) {
        jobs.emitEvent({ event: 'JOB_STATUS_CHANGE', data: { id, status: 'created' } });
        jobs.emitEvent({ event: 'JOB_STATUS_CHANGE', data: { id, status: 'null' } });
      }
      throw err;
    }
    bj.#limit.speed = options.speed ?? 0;
    const job = jobs.createJob({
      id,
      ...(txn !== undefined && { txn }),
      ...(options.autoFinalize !== undefined && { autoFinalize: options.autoFinalize }),
      ...(options.autoDismiss !== undefined && { autoDismiss: options.autoDismiss }),
      ...(options.speed !== undefined && { speed: options.speed }),
      driver: {
        type,
        run: () => body.run(bj),
        ...(body.prepare && { prepare: () => body.prepare!(bj) }),
        ...(body.abort && { abort: () => body.abort!(bj) }),
        ...(body.complete && { complete: () => body.complete!(bj) }),
        ...(body.cancel && { cancel: (_j, force) => body.cancel!(bj, force) }),
        clean: (j) => bj.#clean(j),
        setSpeed: (j, speed) => {
          const old = bj.#limit.speed;
          bj.#limit.speed = speed;
          // A faster (or unlimited) job wakes from its rate-limit sleep (QEMU kicks it).
          if (speed === 0 || speed > old) j.enter();
        },
      },
    });
    bj.#job = job;
    let map = jobsOf.get(graph);
    if (!map) {
      map = new Map();
      jobsOf.set(graph, map);
    }
    map.set(id, bj);
    bj.#unobserve = graph.lock.observeNodeDrain({ begin: (scope) => bj.#drainedBegin(scope) });
    const off = jobs.onStatusChange((e) => {
      if (e.data.id !== id) return;
      // QEMU emits BLOCK_JOB_PENDING only when the user finalizes (job_event_pending).
      if (e.data.status === 'pending' && !job.autoFinalize) {
        jobs.emitEvent({ event: 'BLOCK_JOB_PENDING', data: { type, id } });
      }
      if (e.data.status === 'null') {
        off();
        if (map.get(id) === bj) map.delete(id);
      }
    });
    bj.#started = body.started;
    return bj;
  }

  /** Starts a created job (QEMU job_start). */
  begin(): void {
    this.#begun = true;
    this.job.start();
    this.#started?.(this);
  }

  get job(): Job {
    return this.#job!;
  }

  /**
   * Uses a node for the job (QEMU block_job_add_bdrv): a backend taking `perm` and sharing
   * `shared`, and the node busy for other jobs and graph changes until the job ends.
   * `blk`: the job also does I/O on the node through a BlockBackend of its own in QEMU
   * (commit's base and top), so that blockdev-del finds it in use rather than busy.
   */
  async addNode(
    name: string,
    perm: readonly PermissionName[],
    shared: readonly PermissionName[],
    blk = false,
  ): Promise<void> {
    checkNotBusy(this.graph, name);
    this.#created = true;
    const backend = await this.graph.createBackend(name, {
      name: `${this.type} job '${this.id}'`,
      perm,
      shared,
      jobChild: !blk,
    });
    this.#backends.push(backend);
    blockNodes(this.graph, [name], `block device is in use by block job: ${this.type}`);
    this.#busy.push(name);
  }

  /**
   * Runs `fn` when the job lets go of its nodes, after them (QEMU .clean: commit puts a
   * base it reopened read-write back to read-only); its failure is ignored, as QEMU's.
   */
  onRelease(fn: () => Promise<void>): void {
    this.#onRelease.push(fn);
  }

  /** Freezes backing links parent -> child until the job ends (bdrv_freeze_backing_chain). */
  freeze(links: readonly [string, string][]): void {
    freezeLinks(this.graph, links);
    this.#frozen.push(...links);
  }

  /** Unfreezes the links before the job changes them itself (at prepare). */
  unfreeze(): void {
    unfreezeLinks(this.graph, this.#frozen.splice(0));
  }

  /**
   * Runs `fn` holding the graph's read lock, as any request does. A request that must wait
   * behind a drained section over the job's nodes passes a pause point first (the job
   * pauses, its events sent): in QEMU the drain lets the request finish and the job pauses
   * right after it; here the request waits, the job paused, until the section is over.
   */
  async io<T>(fn: () => Promise<T>): Promise<T> {
    const lock = this.graph.lock;
    let paused = false;
    while (!lock.tryReadForJob()) {
      if (!paused && this.#drainsOverMe > 0 && !this.#pausingInIo && this.#inBody()) {
        paused = true;
        this.#pausingInIo = true;
        try {
          await this.job.pausePoint();
        } finally {
          this.#pausingInIo = false;
        }
        continue;
      }
      // A new drained section over the job's nodes wakes the request: it pauses again.
      if (await this.#waitRead()) paused = false;
    }
    this.#ioInFlight++;
    try {
      return await fn();
    } finally {
      lock.releaseRead();
      if (--this.#ioInFlight === 0 && this.#ioIdle.length > 0) {
        for (const w of this.#ioIdle.splice(0)) w();
      }
    }
  }

  /** Waits until requests are admitted (false) or a drained section over the job begins (true). */
  async #waitRead(): Promise<boolean> {
    this.#waitingRead++;
    for (const w of this.#onWaitingRead.splice(0)) w();
    let wake!: (drained: boolean) => void;
    try {
      return await new Promise<boolean>((resolve) => {
        wake = resolve;
        this.#wakeWaiting.add(wake);
        if (!this.#admittedTaken) {
          this.#admittedTaken = true;
          void this.graph.lock.admitted().then(() => {
            this.#admittedTaken = false;
            for (const w of [...this.#wakeWaiting]) w(false);
          });
        }
      });
    } finally {
      this.#wakeWaiting.delete(wake);
      this.#waitingRead--;
    }
  }

  /** Whether the job's body runs now (it may pass a pause point). */
  #inBody(): boolean {
    const status = this.job.status;
    return status === 'running' || status === 'ready';
  }

  /** Whether the graph's users had requests since the job last rested (give-way.ts). */
  get usersActive(): boolean {
    return this.#giveWay.usersActive;
  }

  /**
   * After `bytes` were copied: sleeps as the speed asks (QEMU block_job_ratelimit_sleep),
   * and while users have requests, once its own are done, rests to give way (give-way.ts);
   * passes a pause point either way.
   */
  async rateLimit(bytes: number): Promise<void> {
    let delay = this.#limit.account(bytes);
    if (this.#giveWay.usersActive) {
      while (this.#ioInFlight > 0) await new Promise<void>((r) => this.#ioIdle.push(r));
      delay = Math.max(delay, this.#giveWay.rest());
    } else this.#giveWay.rest();
    await this.job.sleep(delay);
  }

  /**
   * What to do about an I/O error (QEMU block_job_error_action): 'report' (fail the job),
   * 'ignore' (go on), 'stop' (the job pauses, io-status failed or nospace, until resumed:
   * then the caller retries). Emits BLOCK_JOB_ERROR for each.
   */
  errorAction(
    err: unknown,
    isRead: boolean,
    policy: BlockdevOnError = this.onError,
  ): 'report' | 'ignore' | 'stop' {
    const errno = (err as { errnoName?: string }).errnoName;
    const action =
      policy === 'ignore'
        ? 'ignore'
        : policy === 'stop' || (policy === 'enospc' && errno === 'ENOSPC')
          ? 'stop'
          : 'report';
    const job = this.job;
    if (action === 'stop') {
      if (!job.userPaused) job.pause();
      this.iostatus = errno === 'ENOSPC' ? 'nospace' : 'failed';
    }
    job.registry.emitEvent({
      event: 'BLOCK_JOB_ERROR',
      data: { device: this.id, operation: isRead ? 'read' : 'write', action },
    });
    return action;
  }

  /** Waits while the job is stopped by an error, then clears io-status (QEMU resets it on resume). */
  async afterStop(): Promise<void> {
    await this.job.pausePoint();
    this.iostatus = 'ok';
  }

  /** query-block-jobs entry. */
  info(): BlockJobInfo {
    const job = this.job;
    const len = Math.max(job.progressTotal, job.progressCurrent);
    const status = job.status;
    const info: BlockJobInfo = {
      type: this.type,
      device: this.id,
      len,
      offset: Math.min(job.progressCurrent, len),
      // Busy while the body runs (not in a pause point or sleep, and not after it ended).
      busy: job.busy && (status === 'running' || status === 'ready'),
      paused: job.userPaused || status === 'paused' || status === 'standby',
      speed: job.speed,
      'io-status': this.iostatus,
      ready: status === 'ready' || status === 'standby',
      status,
      'auto-finalize': job.autoFinalize,
      'auto-dismiss': job.autoDismiss,
    };
    if (job.error && (status === 'concluded' || status === 'aborting')) {
      info.error = errorText(job.error);
    }
    return info;
  }

  /** The event data of COMPLETED / CANCELLED / READY (QEMU's). */
  #eventData(): Record<string, unknown> {
    const i = this.info();
    return { type: this.type, device: this.id, len: i.len, offset: i.offset, speed: i.speed };
  }

  /** A job that reached 'ready' (mirror, active commit): BLOCK_JOB_READY after the change. */
  transitionToReady(): void {
    this.job.transitionToReady();
    this.job.registry.emitEvent({ event: 'BLOCK_JOB_READY', data: this.#eventData() });
  }

  /**
   * A drained section over `scope` begins (graph-lock.ts, DrainScope): when it drains one
   * of the job's nodes (a node drained drains its parents, up to the job:
   * child_job_drained_begin), the job pauses until the section ends; the section waits
   * until it is quiet.
   */
  #drainedBegin(scope: DrainScope): DrainStop | undefined {
    if (!this.#drainsMe(scope)) return undefined;
    const job = this.job;
    job.drainedBegin();
    this.#drainsOverMe++;
    // Quiet once paused, or once a request of the body waits for the read side again (a
    // force-cancelled job passes no pause point).
    const quiet = (): Promise<void> =>
      Promise.race([
        job.drainedQuiet(),
        new Promise<void>((resolve) => this.#onWaitingRead.push(resolve)),
      ]);
    let stopped: Promise<void>;
    if (this.#waitingRead > 0 && this.#inBody() && !this.#pausingInIo && !job.paused) {
      // A request waits behind another drained section: it passes a pause point (io).
      for (const w of [...this.#wakeWaiting]) w(true);
      stopped = quiet();
    } else if (this.#waitingRead > 0) {
      stopped = Promise.resolve();
    } else {
      stopped = quiet();
    }
    return {
      quiet: stopped,
      end: () => {
        this.#drainsOverMe--;
        job.drainedEnd();
      },
    };
  }

  /**
   * Whether `scope` drains one of the job's nodes: every node ('all'); a node drained
   * with its subtree when that subtree meets a job node's (the job node is in it, or is
   * a parent of a node in it); a node alone when it is a job node or below one.
   */
  #drainsMe(scope: DrainScope): boolean {
    if (scope === 'all') return true;
    const graph = this.graph;
    const withDescendants = (roots: Iterable<string>): Set<BlockNode> => {
      const out = new Set<BlockNode>();
      for (const name of roots) {
        if (!graph.hasNode(name)) continue;
        const node = graph.node(name) as BlockNode;
        out.add(node);
        for (const d of graph.descendants(node)) out.add(d);
      }
      return out;
    };
    const mine = withDescendants(this.#busy);
    const drained =
      'subtree' in scope
        ? withDescendants(scope.subtree)
        : scope.nodes.filter((n) => graph.hasNode(n)).map((n) => graph.node(n) as BlockNode);
    for (const n of drained) if (mine.has(n)) return true;
    return false;
  }

  /** QEMU .clean, then the event of the end (job_finalize_single): nodes given back first. */
  async #clean(job: Job): Promise<void> {
    await this.#release();
    if (!this.#begun) return; // QEMU: events only for a job that started
    const data = this.#eventData();
    if (job.isCancelled) {
      job.registry.emitEvent({ event: 'BLOCK_JOB_CANCELLED', data });
    } else {
      if (job.error) data.error = errorText(job.error);
      job.registry.emitEvent({ event: 'BLOCK_JOB_COMPLETED', data });
    }
  }

  async #release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    this.#unobserve?.();
    this.unfreeze();
    unblockNodes(this.graph, this.#busy.splice(0));
    for (const b of this.#backends.splice(0)) await b.close();
    for (const fn of this.#onRelease.splice(0)) await fn().catch(() => {});
  }
}
