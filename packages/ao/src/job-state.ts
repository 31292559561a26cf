// A job's state (QEMU's struct Job in job.c), below the public classes of job.ts: the
// run and pause-point logic (job-run.ts) and the completion, transaction and cancel logic
// (job-txn.ts) are functions over it. It knows the public job only as `J`, what it hands
// to the driver's hooks and to the registry; the interfaces below are what it needs of the
// driver, the transaction and the registry, so that none of these modules imports job.ts.

import type { Ao } from './ao.ts';
import { AoError, AoErrorCode, JobVerbError } from './errors.ts';
import { ProgressMeter } from './job-progress.ts';
import {
  type JobStatus,
  type JobVerb,
  jobTransitionAllowed,
  jobVerbAllowed,
} from './job-tables.ts';

/** The driver hooks the state machine calls, each with the public job (JobDriver of
 * job.ts extends it). */
export interface JobDriverHooks<J> {
  run(job: J): void | Promise<void>;
  prepare?(job: J): void | Promise<void>;
  commit?(job: J): void | Promise<void>;
  abort?(job: J): void | Promise<void>;
  clean?(job: J): void | Promise<void>;
  cancel?(job: J, force: boolean): boolean;
}

/** What a job needs of its registry (JobRegistry of job.ts implements it). */
export interface JobRegistryHooks<J> {
  /** A status change, to be sent as JOB_STATUS_CHANGE. */
  _emit(id: string, status: JobStatus): void;
  /** The job was dismissed. */
  _remove(job: J): void;
}

/** The state of a transaction (QEMU JobTxn); JobTxn of job.ts is its public face. */
export class JobTxnState<J> {
  /** The jobs still in the transaction (a job leaves it when it concludes). */
  readonly jobs: JobState<J>[] = [];
  aborting = false;
  finalizing = false;
}

/** What a job's state is made from (the job's public fields). */
export interface JobStateInit<J> {
  readonly id: string;
  readonly driver: JobDriverHooks<J>;
  readonly registry: JobRegistryHooks<J>;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
}

/** The mutable state of one job and the primitives every part of the job uses. */
export class JobState<J> {
  /** The public job: what the driver's hooks and the registry are given. */
  readonly job: J;
  readonly id: string;
  readonly driver: JobDriverHooks<J>;
  readonly registry: JobRegistryHooks<J>;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  txn: JobTxnState<J> | undefined;
  status: JobStatus = 'undefined';
  /** Set by the public job's constructor, which creates the ao. */
  ao!: Ao<void>;
  pauseCount = 1;
  userPaused = false;
  paused = true;
  busy = false;
  started = false;
  deferred = false;
  cancelled = false;
  forceCancel = false;
  error: Error | undefined;
  speed = 0;
  readonly progress = new ProgressMeter((current, total) => {
    if (!this.ao.completed) this.ao.reportProgress(current, total);
  });
  wake: (() => void) | undefined;
  /** Set by a pause point: what entering the job does first (its status back). */
  onResume: (() => void) | undefined;
  /** The wake-up of a sleep under way: a timer, or an immediate for a sleep of 0 ms. */
  sleepTimer: NodeJS.Timeout | NodeJS.Immediate | undefined;
  bodyDone: Promise<void> | undefined;
  ended = false;
  endWaiters: (() => void)[] = [];
  /** Waiting until the body runs no code until entered again (see `quiet`). */
  quietWaiters: (() => void)[] = [];

  constructor(job: J, init: JobStateInit<J>) {
    this.job = job;
    this.id = init.id;
    this.driver = init.driver;
    this.registry = init.registry;
    this.autoFinalize = init.autoFinalize;
    this.autoDismiss = init.autoDismiss;
  }

  transition(to: JobStatus): void {
    const from = this.status;
    if (!jobTransitionAllowed(from, to)) {
      throw new AoError(
        AoErrorCode.JOB_STATE,
        `Job '${this.id}': transition from '${from}' to '${to}' is not allowed`,
      );
    }
    this.status = to;
    if (from !== to) this.registry._emit(this.id, to);
  }

  applyVerb(verb: JobVerb): void {
    if (!jobVerbAllowed(verb, this.status)) throw new JobVerbError(this.id, this.status, verb);
  }

  isCompleted(): boolean {
    const s = this.status;
    return (
      s === 'waiting' || s === 'pending' || s === 'aborting' || s === 'concluded' || s === 'null'
    );
  }

  requireRunning(what: string): void {
    if (!this.started || this.deferred) {
      throw new AoError(
        AoErrorCode.JOB_STATE,
        `Job '${this.id}': ${what} is only for the job's own body while it runs`,
      );
    }
  }

  /**
   * No code of the job's body runs until it is entered again (QEMU child_job_drained_poll
   * false): it waits in a pause point, `yield` or `sleep`, has not started, or is done.
   */
  get quiet(): boolean {
    return !this.busy || !this.started || this.deferred;
  }

  /** Resolves the quiet waiters once the body is quiet. */
  notifyQuiet(): void {
    if (!this.quiet || this.quietWaiters.length === 0) return;
    const waiters = this.quietWaiters;
    this.quietWaiters = [];
    for (const w of waiters) w();
  }

  /** Drops the wake-up of a sleep under way, if any. */
  clearSleep(): void {
    const t = this.sleepTimer;
    if (!t) return;
    this.sleepTimer = undefined;
    if ('refresh' in t) clearTimeout(t);
    else clearImmediate(t);
  }

  /** Wakes the job's body if it is waiting in `yield`, `sleep` or a pause point. */
  enter(): void {
    if (!this.started || this.deferred || this.busy) return;
    this.clearSleep();
    this.busy = true;
    const wake = this.wake;
    this.wake = undefined;
    const resumed = this.onResume;
    this.onResume = undefined;
    // Out of a pause point the status changes now, as QEMU's coroutine runs at once: its
    // JOB_STATUS_CHANGE comes before the reply of the verb that resumed it.
    resumed?.();
    wake?.();
  }

  async doYield(ms?: number): Promise<void> {
    this.busy = false;
    this.notifyQuiet();
    await new Promise<void>((resolve) => {
      this.wake = resolve;
      if (ms !== undefined) {
        const wakeUp = () => {
          this.sleepTimer = undefined;
          this.enter();
        };
        // A sleep of 0 (a block job's rate limit with no speed, after each chunk) lets the
        // event loop run once, as QEMU's job_sleep_ns(0) does: Node's 0 ms timer waits
        // 1 ms, which a stream of 512 KiB chunks spent 2 s of every GiB in.
        this.sleepTimer = ms === 0 ? setImmediate(wakeUp) : setTimeout(wakeUp, ms);
      }
    });
  }
}

export function toError(e: unknown): Error {
  if (e instanceof Error) return e;
  return new AoError(AoErrorCode.NON_ERROR_FAILURE, `job failed with ${String(e)}`, {
    cause: e,
  });
}

/** Rethrows a failure of a step nobody awaits, as an uncaught exception. */
export function surface(p: Promise<void>): void {
  p.catch((err: unknown) =>
    queueMicrotask(() => {
      throw err;
    }),
  );
}

export function checkSpeed(speed: number): number {
  if (typeof speed !== 'number' || !Number.isSafeInteger(speed) || speed < 0) {
    throw new AoError(
      AoErrorCode.INVALID_ARGUMENT,
      `Invalid parameter 'speed': expected an integer >= 0, got ${String(speed)}`,
    );
  }
  return speed;
}
