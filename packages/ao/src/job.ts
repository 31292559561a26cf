// Jobs after QEMU's job.c: the state machine of job-tables.ts, the verbs of QMP
// (job-cancel, job-pause, job-resume, block-job-set-speed, job-complete, job-finalize,
// job-dismiss, block-job-change), pause points, auto-finalize / auto-dismiss,
// transactions, JOB_STATUS_CHANGE events and query-jobs.
//
// Differences from QEMU, by design:
// - A verb refused by JobVerbTable fails first, whatever else is wrong (QEMU checks
//   "was not paused" before the table for resume).
// - Driver hooks (prepare, commit, abort, clean) may be asynchronous. While a
//   transaction finalizes or aborts, its jobs stay in 'pending' / 'aborting' and a cancel
//   or finalize accepted by the table is a no-op (QEMU runs these steps under its lock,
//   where no verb can come in between).
// - Every job has an ID (no internal jobs); each runs as an ao (kind `job:<type>`), so a
//   job that never ends shows in the live-ao registry.

import { type Ao, type AoHandle, initiateAo, type ProgressReport } from './ao.ts';
import { defer } from './defer.ts';
import { AoError, AoErrorCode, JobVerbError } from './errors.ts';
import type { AoEventSink } from './event-queue.ts';
import {
  type JobStatus,
  type JobType,
  type JobVerb,
  jobTransitionAllowed,
  jobVerbAllowed,
} from './job-tables.ts';

/** What a kind of job does (QEMU JobDriver). Only `type` and `run` are required. */
export interface JobDriver {
  /** The job type reported by query-jobs (QEMU JobType; other names are allowed). */
  readonly type: JobType | (string & {});
  /** The job's work. Call `job.pausePoint()` (or `sleep` / `yield`) between steps; stop
   * early when `job.isCancelled`. Throwing fails the job. */
  run(job: Job): void | Promise<void>;
  /** Last step that may still fail the whole transaction (QEMU .prepare). */
  prepare?(job: Job): void | Promise<void>;
  /** Makes the job's changes permanent; the transaction succeeded (QEMU .commit). */
  commit?(job: Job): void | Promise<void>;
  /** Undoes the job's changes; the job or its transaction failed (QEMU .abort). */
  abort?(job: Job): void | Promise<void>;
  /** Cleanup after commit or abort (QEMU .clean). */
  clean?(job: Job): void | Promise<void>;
  /** job-complete: tell a ready job to finish (e.g. mirror pivots). Without it, the
   * 'complete' verb fails with ERR_VMDISK_AO_JOB_CANNOT_COMPLETE. */
  complete?(job: Job): void;
  /** Soft cancel support (QEMU .cancel): returns whether the cancel is forced. Without
   * it every cancel is forced. */
  cancel?(job: Job, force: boolean): boolean;
  /** Called when the speed changes (block-job-set-speed). */
  setSpeed?(job: Job, speed: number): void;
  /** block-job-change. Without it, the 'change' verb fails. */
  change?(job: Job, options: unknown): void;
}

export interface JobOptions {
  /** The job ID: a letter, then letters, digits, '-', '.', '_' (QEMU id_wellformed). */
  readonly id: string;
  readonly driver: JobDriver;
  /** The transaction the job belongs to; without it the job is alone in its own. */
  readonly txn?: JobTxn;
  /** Finalize as soon as the transaction is pending (default true). */
  readonly autoFinalize?: boolean;
  /** Dismiss as soon as the job concluded (default true). */
  readonly autoDismiss?: boolean;
  /** Initial speed (bytes per second, 0 = unlimited); see `setSpeed`. */
  readonly speed?: number;
  /** Aborting this signal force-cancels the job. */
  readonly signal?: AbortSignal;
  /** Runs the job's ao as a nested ao of `parent`. */
  readonly parent?: Ao<unknown>;
}

/** One entry of query-jobs (QMP JobInfo). */
export interface JobInfo {
  readonly id: string;
  readonly type: string;
  readonly status: JobStatus;
  readonly 'current-progress': number;
  readonly 'total-progress': number;
  readonly error?: string;
}

/** The QMP event a status change is forwarded as (the app adds the timestamp). */
export interface JobStatusChangeEvent {
  readonly event: 'JOB_STATUS_CHANGE';
  readonly data: { readonly id: string; readonly status: JobStatus };
}

/** Another event of a job (a block job's BLOCK_JOB_COMPLETED, ...), delivered with the
 * JOB_STATUS_CHANGE events, in order with them (JobRegistry.emitEvent). */
export interface JobEvent {
  readonly event: string;
  readonly data: Readonly<Record<string, unknown>>;
}

const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

function toError(e: unknown): Error {
  if (e instanceof Error) return e;
  return new AoError(AoErrorCode.NON_ERROR_FAILURE, `job failed with ${String(e)}`, {
    cause: e,
  });
}

function surface(p: Promise<void>): void {
  p.catch((err: unknown) =>
    queueMicrotask(() => {
      throw err;
    }),
  );
}

/** A transactional group of jobs (QEMU JobTxn): they finalize together, and when one
 * fails, all are cancelled and aborted. */
export class JobTxn {
  readonly registry: JobRegistry;
  /** @internal */
  readonly _jobs: Job[] = [];
  /** @internal */
  _aborting = false;
  /** @internal */
  _finalizing = false;

  /** @internal use JobRegistry.createTransaction() */
  constructor(registry: JobRegistry) {
    this.registry = registry;
  }

  /** The jobs still in the transaction (a job leaves it when it concludes). */
  get jobs(): readonly Job[] {
    return [...this._jobs];
  }
}

/** A job: the verbs for its user, and what its driver's `run` uses. */
export class Job {
  readonly id: string;
  readonly type: string;
  readonly driver: JobDriver;
  readonly registry: JobRegistry;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  #txn: JobTxn | undefined;
  #status: JobStatus = 'undefined';
  #ao!: Ao<void>;
  #pauseCount = 1;
  #userPaused = false;
  #paused = true;
  #busy = false;
  #started = false;
  #deferred = false;
  #cancelled = false;
  #forceCancel = false;
  #error: Error | undefined;
  #speed = 0;
  #progressCurrent = 0;
  #progressTotal = 0;
  #wake: (() => void) | undefined;
  #sleepTimer: NodeJS.Timeout | undefined;
  #bodyDone: Promise<void> | undefined;
  #ended = false;
  #endWaiters: (() => void)[] = [];

  /** @internal use JobRegistry.createJob() */
  constructor(registry: JobRegistry, options: JobOptions, txn: JobTxn) {
    this.registry = registry;
    this.id = options.id;
    this.driver = options.driver;
    this.type = options.driver.type;
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
    if (options.speed !== undefined) this.#speed = checkSpeed(options.speed);
    initiateAo<void>(
      `job:${this.type}`,
      { callback: () => {} },
      (ao) => {
        this.#ao = ao;
      },
      {
        ...(options.signal && { signal: options.signal }),
        ...(options.parent && { parent: options.parent }),
      },
    );
    this.#ao.signal.addEventListener('abort', () => this.#onAoAbort(), { once: true });
    this.#txn = txn;
    txn._jobs.push(this);
    this.#transition('created');
    if (this.#ao.aborted) this.#onAoAbort();
  }

  // ---- state, as the user and the driver see it ----

  get status(): JobStatus {
    return this.#status;
  }

  /** The error the job failed with (also set for cancelled jobs: ERR_VMDISK_AO_JOB_CANCELLED). */
  get error(): Error | undefined {
    return this.#error;
  }

  /** The transaction the job is in, until it concludes. */
  get txn(): JobTxn | undefined {
    return this.#txn;
  }

  /** The job's ao (kind `job:<type>`), live until the job concludes. */
  get ao(): AoHandle<void> {
    return this.#ao;
  }

  /** Aborted when the job is force-cancelled; pass it to what the job waits on. */
  get signal(): AbortSignal {
    return this.#ao.signal;
  }

  /** The job must stop: it was force-cancelled (QEMU job_is_cancelled). */
  get isCancelled(): boolean {
    return this.#forceCancel;
  }

  /** A cancel was requested, forced or not (QEMU job_cancel_requested). */
  get cancelRequested(): boolean {
    return this.#cancelled;
  }

  /** The user paused the job (job-pause) and has not resumed it. */
  get userPaused(): boolean {
    return this.#userPaused;
  }

  /** The job is at a pause point, waiting to be resumed. */
  get paused(): boolean {
    return this.#paused;
  }

  /** The job's body is running, not waiting in a pause point, sleep or yield (QEMU busy). */
  get busy(): boolean {
    return this.#busy;
  }

  /** Speed limit set by set-speed (0 = unlimited). */
  get speed(): number {
    return this.#speed;
  }

  get progressCurrent(): number {
    return this.#progressCurrent;
  }

  get progressTotal(): number {
    return this.#progressTotal;
  }

  /** query-jobs entry. */
  info(): JobInfo {
    const base = {
      id: this.id,
      type: this.type,
      status: this.#status,
      'current-progress': this.#progressCurrent,
      'total-progress': this.#progressTotal,
    };
    return this.#error ? { ...base, error: this.#error.message } : base;
  }

  /** Progress (current / total) as an async iterator ending when the job concludes. */
  progress(): AsyncIterableIterator<ProgressReport> {
    return this.#ao.progress();
  }

  /**
   * Resolves when the job has concluded (or was dismissed before it ran): with nothing
   * on success, rejecting with `job.error` on failure. The promise is made on demand.
   */
  wait(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const settle = (): void => (this.#error ? reject(this.#error) : resolve());
      if (this.#ended) settle();
      else this.#endWaiters.push(settle);
    });
  }

  // ---- internal machinery ----

  #transition(to: JobStatus): void {
    const from = this.#status;
    if (!jobTransitionAllowed(from, to)) {
      throw new AoError(
        AoErrorCode.JOB_STATE,
        `Job '${this.id}': transition from '${from}' to '${to}' is not allowed`,
      );
    }
    this.#status = to;
    if (from !== to) this.registry._emit(this.id, to);
  }

  #applyVerb(verb: JobVerb): void {
    if (!jobVerbAllowed(verb, this.#status)) throw new JobVerbError(this.id, this.#status, verb);
  }

  #isCompleted(): boolean {
    const s = this.#status;
    return (
      s === 'waiting' || s === 'pending' || s === 'aborting' || s === 'concluded' || s === 'null'
    );
  }

  #onAoAbort(): void {
    // The caller's signal or the parent ao aborted the job's ao: a forced cancel, unless
    // the job is already past the point where a cancel means anything.
    if (this.#forceCancel) return;
    const s = this.#status;
    if (s === 'aborting' || s === 'concluded' || s === 'null') return;
    this.#cancel(true);
  }

  /** Wakes the job's body if it is waiting in `yield`, `sleep` or a pause point. */
  enter(): void {
    if (!this.#started || this.#deferred || this.#busy) return;
    if (this.#sleepTimer) {
      clearTimeout(this.#sleepTimer);
      this.#sleepTimer = undefined;
    }
    this.#busy = true;
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  async #doYield(ms?: number): Promise<void> {
    this.#busy = false;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
      if (ms !== undefined) {
        this.#sleepTimer = setTimeout(() => {
          this.#sleepTimer = undefined;
          this.enter();
        }, ms);
      }
    });
  }

  #requireRunning(what: string): void {
    if (!this.#started || this.#deferred) {
      throw new AoError(
        AoErrorCode.JOB_STATE,
        `Job '${this.id}': ${what} is only for the job's own body while it runs`,
      );
    }
  }

  /**
   * A point where the job may be paused (QEMU job_pause_point): if a pause is pending
   * and the job is not cancelled, the job goes to 'paused' (or 'standby' when 'ready')
   * until resumed or cancelled.
   */
  async pausePoint(): Promise<void> {
    this.#requireRunning('pausePoint()');
    if (this.#pauseCount === 0 || this.#forceCancel) return;
    const status = this.#status;
    this.#transition(status === 'ready' ? 'standby' : 'paused');
    this.#paused = true;
    await this.#doYield();
    this.#paused = false;
    this.#transition(status);
  }

  /** Waits until the job is entered (a verb or `enter()`), then passes a pause point. */
  async yield(): Promise<void> {
    this.#requireRunning('yield()');
    if (this.#forceCancel) return;
    if (this.#pauseCount === 0) await this.#doYield();
    await this.pausePoint();
  }

  /** Sleeps `ms` milliseconds (woken early by a cancel), then passes a pause point. */
  async sleep(ms: number): Promise<void> {
    this.#requireRunning('sleep()');
    if (!Number.isFinite(ms) || ms < 0) {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, `sleep() takes milliseconds >= 0, not ${ms}`);
    }
    if (this.#forceCancel) return;
    if (this.#pauseCount === 0) await this.#doYield(ms);
    await this.pausePoint();
  }

  /** The job is ready for job-complete (QEMU job_transition_to_ready). */
  transitionToReady(): void {
    this.#requireRunning('transitionToReady()');
    this.#transition('ready');
  }

  /** Adds `done` to the current progress (QEMU job_progress_update). */
  progressUpdate(done: number): void {
    checkCount('progress', done);
    this.#progressCurrent += done;
    this.#reportProgress();
  }

  /** Total = current + remaining (QEMU job_progress_set_remaining). */
  progressSetRemaining(remaining: number): void {
    checkCount('remaining', remaining);
    this.#progressTotal = this.#progressCurrent + remaining;
    this.#reportProgress();
  }

  /** Total += delta (QEMU job_progress_increase_remaining). */
  progressIncreaseRemaining(delta: number): void {
    checkCount('delta', delta);
    this.#progressTotal += delta;
    this.#reportProgress();
  }

  #reportProgress(): void {
    if (!this.#ao.completed) this.#ao.reportProgress(this.#progressCurrent, this.#progressTotal);
  }

  /** Starts the job's body (QEMU job_start); the job goes 'created' -> 'running'. */
  start(): void {
    if (this.#started || this.#status !== 'created') {
      throw new AoError(
        AoErrorCode.JOB_ALREADY_STARTED,
        `Job '${this.id}' in state '${this.#status}' cannot be started`,
      );
    }
    this.#started = true;
    this.#pauseCount--;
    this.#busy = true;
    this.#paused = false;
    this.#transition('running');
    this.#bodyDone = new Promise<void>((resolve) => {
      defer(() => surface(this.#coEntry().then(resolve)));
    });
  }

  async #coEntry(): Promise<void> {
    await this.pausePoint();
    let err: Error | undefined;
    try {
      await this.driver.run(this);
    } catch (e) {
      err = toError(e);
    }
    if (err && !this.#error) this.#error = err;
    this.#deferred = true;
    this.#busy = true;
    if (this.#sleepTimer) clearTimeout(this.#sleepTimer);
    await this.#completed();
  }

  #updateRc(): void {
    if (!this.#error && this.#forceCancel) {
      this.#error = new AoError(AoErrorCode.JOB_CANCELLED, 'Operation canceled');
    }
    if (this.#error) this.#transition('aborting');
  }

  async #completed(): Promise<void> {
    this.#updateRc();
    if (this.#error) await txnAbort(this.#txn!, this);
    else await txnSuccess(this.#txn!, this);
  }

  /** @internal */
  _isCompleted(): boolean {
    return this.#isCompleted();
  }

  /** @internal: the body has finished (or, not started, the job completed at once). */
  async _finishSync(): Promise<void> {
    if (this.#isCompleted()) return;
    if (!this.#started) {
      this.#deferred = true;
      this.#updateRc();
      return;
    }
    await this.#bodyDone;
  }

  /** @internal */
  _transitionWaiting(): void {
    this.#transition('waiting');
  }

  /** @internal */
  _transitionToPending(): void {
    this.#transition('pending');
  }

  /** @internal: QEMU job_prepare. */
  async _prepare(): Promise<boolean> {
    if (!this.#error && this.driver.prepare) {
      try {
        await this.driver.prepare(this);
      } catch (e) {
        this.#error = toError(e);
      }
      this.#updateRc();
    }
    return this.#error === undefined;
  }

  /** @internal: QEMU job_finalize_single. */
  async _finalizeSingle(): Promise<void> {
    this.#updateRc();
    const hook = async (fn: ((job: Job) => void | Promise<void>) | undefined): Promise<void> => {
      if (!fn) return;
      try {
        await fn.call(this.driver, this);
      } catch (e) {
        if (!this.#error) this.#error = toError(e);
      }
    };
    if (!this.#error) await hook(this.driver.commit);
    else await hook(this.driver.abort);
    await hook(this.driver.clean);
    this.#leaveTxn();
    this.#conclude();
  }

  /** @internal: QEMU job_cancel_async. */
  _cancelAsync(forceIn: boolean): void {
    // A forced cancel stays forced; a soft one is forced unless the driver supports it.
    const force = forceIn || (this.driver.cancel ? this.driver.cancel(this, forceIn) : true);
    if (this.#userPaused) {
      this.#userPaused = false;
      this.#pauseCount--;
    }
    if (force || !this.#deferred) {
      this.#cancelled = true;
      this.#forceCancel ||= force;
    }
    if (this.#forceCancel && !this.#ao.aborted) {
      this.#ao.abort(new AoError(AoErrorCode.JOB_CANCELLED, `Job '${this.id}' was cancelled`));
    }
  }

  #leaveTxn(): void {
    const txn = this.#txn;
    if (!txn) return;
    const i = txn._jobs.indexOf(this);
    if (i >= 0) txn._jobs.splice(i, 1);
    this.#txn = undefined;
  }

  #conclude(): void {
    this.#transition('concluded');
    this.#end();
    if (this.autoDismiss || !this.#started) this.#doDismiss();
  }

  #end(): void {
    if (this.#ended) return;
    this.#ended = true;
    if (!this.#ao.completed) this.#ao._settle(this.#error ?? null);
    const waiters = this.#endWaiters;
    this.#endWaiters = [];
    for (const w of waiters) w();
  }

  #doDismiss(): void {
    this.#busy = false;
    this.#paused = false;
    this.#deferred = true;
    this.#leaveTxn();
    this.#transition('null');
    this.registry._remove(this);
    this.#end();
  }

  #cancel(force: boolean): void {
    if (this.#status === 'concluded') {
      this.#doDismiss();
      return;
    }
    const txn = this.#txn!;
    // Too late: the transaction is committing (or aborting already); see the header.
    if (txn._finalizing) return;
    this._cancelAsync(force);
    if (!this.#started) {
      this.#deferred = true;
      surface(this.#completed());
    } else if (this.#deferred) {
      if (this.#forceCancel && !txn._finalizing && !txn._aborting) surface(txnAbort(txn, this));
    } else {
      this.enter();
    }
  }

  // ---- verbs (QMP commands): each is checked against JobVerbTable first ----

  /** job-cancel. `force` matters only for drivers with soft cancel (e.g. a ready mirror). */
  cancel(force = false): void {
    this.#applyVerb('cancel');
    this.#cancel(force);
  }

  /** job-pause: the job pauses at its next pause point. */
  pause(): void {
    this.#applyVerb('pause');
    if (this.#userPaused) {
      throw new AoError(AoErrorCode.JOB_ALREADY_PAUSED, `Job '${this.id}' is already paused`);
    }
    this.#userPaused = true;
    this.#pauseCount++;
    if (!this.#paused) this.enter();
  }

  /** job-resume. */
  resume(): void {
    this.#applyVerb('resume');
    if (!this.#userPaused || this.#pauseCount <= 0) {
      throw new AoError(
        AoErrorCode.JOB_NOT_PAUSED,
        `Can't resume job '${this.id}': it was not paused`,
      );
    }
    this.#userPaused = false;
    this.#pauseCount--;
    if (this.#pauseCount === 0 && !this.#sleepTimer) this.enter();
  }

  /** block-job-set-speed (0 = unlimited). */
  setSpeed(speed: number): void {
    this.#applyVerb('set-speed');
    this.#speed = checkSpeed(speed);
    this.driver.setSpeed?.(this, this.#speed);
  }

  /** job-complete: a ready job finishes (driver's `complete`). */
  complete(): void {
    this.#applyVerb('complete');
    if (this.#cancelled || !this.driver.complete) {
      throw new AoError(
        AoErrorCode.JOB_CANNOT_COMPLETE,
        `The job '${this.id}' cannot be completed`,
      );
    }
    this.driver.complete(this);
  }

  /** job-finalize: finalizes the whole transaction of this pending job. */
  finalize(): void {
    this.#applyVerb('finalize');
    const txn = this.#txn!;
    if (txn._finalizing || txn._aborting) return;
    surface(doFinalize(txn, this));
  }

  /** job-dismiss: removes a concluded job. */
  dismiss(): void {
    this.#applyVerb('dismiss');
    this.#doDismiss();
  }

  /** block-job-change. */
  change(options: unknown): void {
    this.#applyVerb('change');
    if (!this.driver.change) {
      throw new AoError(
        AoErrorCode.JOB_CHANGE_UNSUPPORTED,
        `Job '${this.id}' of type '${this.type}' does not support change`,
      );
    }
    this.driver.change(this, options);
  }
}

function checkSpeed(speed: number): number {
  if (typeof speed !== 'number' || !Number.isSafeInteger(speed) || speed < 0) {
    throw new AoError(
      AoErrorCode.INVALID_ARGUMENT,
      `Invalid parameter 'speed': expected an integer >= 0, got ${String(speed)}`,
    );
  }
  return speed;
}

function checkCount(what: string, n: number): void {
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, `${what} must be a number >= 0, got ${n}`);
  }
}

// ---- transactions (QEMU job_completed_txn_success / _abort, job_do_finalize) ----

async function txnSuccess(txn: JobTxn, job: Job): Promise<void> {
  job._transitionWaiting();
  if (txn._aborting) return;
  if (txn._jobs.some((other) => !other._isCompleted())) return;
  for (const other of txn.jobs) other._transitionToPending();
  if (txn._jobs.every((other) => other.autoFinalize)) await doFinalize(txn, job);
}

async function doFinalize(txn: JobTxn, job: Job): Promise<void> {
  txn._finalizing = true;
  try {
    let ok = true;
    for (const other of txn.jobs) {
      if (!(await other._prepare())) {
        ok = false;
        break;
      }
    }
    if (!ok) {
      txn._finalizing = false;
      await txnAbort(txn, job);
      return;
    }
    for (const other of txn.jobs) await other._finalizeSingle();
  } finally {
    txn._finalizing = false;
  }
}

async function txnAbort(txn: JobTxn, job: Job): Promise<void> {
  if (txn._aborting) return;
  txn._aborting = true;
  for (const other of txn.jobs) {
    // One failure decides the transaction: cancel the others as fast as possible.
    if (other !== job) other._cancelAsync(true);
  }
  for (const other of txn.jobs) other.enter();
  while (txn._jobs.length > 0) {
    const other = txn._jobs[0]!;
    await other._finishSync();
    await other._finalizeSingle();
  }
}

/** The jobs of one monitor: IDs are unique within a registry. */
export class JobRegistry {
  readonly #jobs = new Map<string, Job>();
  readonly #listeners = new Set<(event: JobStatusChangeEvent) => void>();
  readonly #queue: AoEventSink<JobStatusChangeEvent | JobEvent> | undefined;

  /** `events`: an EventQueue (or any sink with push) that also receives every
   * JOB_STATUS_CHANGE event, in order. */
  constructor(options: { events?: AoEventSink<JobStatusChangeEvent | JobEvent> } = {}) {
    const events = options.events;
    if (events !== undefined && (events === null || typeof events.push !== 'function')) {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'events must have a push method');
    }
    this.#queue = events;
  }

  /** Creates a job in 'created' (QEMU job_create); call `job.start()` to run it. */
  createJob(options: JobOptions): Job {
    if (options === null || typeof options !== 'object') {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'job options must be an object');
    }
    const { id, driver, txn } = options;
    if (typeof id !== 'string' || !ID_RE.test(id)) {
      throw new AoError(AoErrorCode.JOB_ID_INVALID, `Invalid job ID '${String(id)}'`);
    }
    if (this.#jobs.has(id)) {
      throw new AoError(AoErrorCode.JOB_ID_IN_USE, `Job ID '${id}' already in use`);
    }
    if (
      driver === null ||
      typeof driver !== 'object' ||
      typeof driver.run !== 'function' ||
      typeof driver.type !== 'string' ||
      driver.type.length === 0
    ) {
      throw new AoError(
        AoErrorCode.INVALID_ARGUMENT,
        'job driver must have a type (non-empty string) and a run function',
      );
    }
    if (txn !== undefined) {
      if (!(txn instanceof JobTxn) || txn.registry !== this) {
        throw new AoError(AoErrorCode.JOB_TXN, 'the transaction belongs to another registry');
      }
      if (txn._aborting || txn._finalizing) {
        throw new AoError(AoErrorCode.JOB_TXN, 'the transaction is already ending');
      }
    }
    if (options.speed !== undefined) checkSpeed(options.speed);
    const job = new Job(this, options, txn ?? new JobTxn(this));
    this.#jobs.set(id, job);
    return job;
  }

  /** A new, empty transaction; pass it as `txn` to `createJob`. */
  createTransaction(): JobTxn {
    return new JobTxn(this);
  }

  /** The job with that ID, or undefined. */
  find(id: string): Job | undefined {
    return this.#jobs.get(id);
  }

  /** The job with that ID; throws ERR_VMDISK_AO_JOB_NOT_FOUND. */
  get(id: string): Job {
    const job = this.#jobs.get(id);
    if (!job) throw new AoError(AoErrorCode.JOB_NOT_FOUND, `Job '${id}' not found`);
    return job;
  }

  /** Every job not yet dismissed, in creation order. */
  get jobs(): readonly Job[] {
    return [...this.#jobs.values()];
  }

  /** QMP query-jobs. */
  query(): JobInfo[] {
    return this.jobs.map((j) => j.info());
  }

  /**
   * Force-cancels every job and waits until all have ended, dismissing the concluded
   * ones (QEMU job_cancel_sync_all, for shutdown). Jobs whose transaction is already
   * finalizing end normally. Resolves when the registry is empty.
   */
  async cancelAll(): Promise<void> {
    for (let round = 0; this.#jobs.size > 0; round++) {
      const jobs = this.jobs;
      for (const job of jobs) {
        if (job.status === 'concluded') job.dismiss();
        else if (jobVerbAllowed('cancel', job.status)) job.cancel(true);
      }
      await Promise.all(jobs.map((job) => job.wait().catch(() => {})));
      for (const job of jobs) if (job.status === 'concluded') job.dismiss();
      if (round > 1000) {
        throw new AoError(AoErrorCode.JOB_STATE, 'jobs keep appearing while cancelling all');
      }
    }
  }

  /** Calls `listener` (later, in order) for every JOB_STATUS_CHANGE; returns an unsubscribe. */
  onStatusChange(listener: (event: JobStatusChangeEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  /** Queues another event of a job to the events sink, after every event queued before. */
  emitEvent(event: JobEvent): void {
    const queue = this.#queue;
    if (queue) defer(() => queue.push(event));
  }

  /** @internal */
  _emit(id: string, status: JobStatus): void {
    const event: JobStatusChangeEvent = { event: 'JOB_STATUS_CHANGE', data: { id, status } };
    if (this.#listeners.size === 0 && !this.#queue) return;
    for (const l of [...this.#listeners]) defer(() => l(event));
    const queue = this.#queue;
    if (queue) defer(() => queue.push(event));
  }

  /** @internal */
  _remove(job: Job): void {
    if (this.#jobs.get(job.id) === job) this.#jobs.delete(job.id);
  }
}
