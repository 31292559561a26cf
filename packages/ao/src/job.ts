// Jobs after QEMU's job.c: the state machine of job-tables.ts, the verbs of QMP
// (job-cancel, job-pause, job-resume, block-job-set-speed, job-complete, job-finalize,
// job-dismiss, block-job-change), pause points, auto-finalize / auto-dismiss,
// transactions, JOB_STATUS_CHANGE events and query-jobs.
//
// This file is the public classes, thin; the job's state is a JobState (job-state.ts),
// and the machinery runs over it: job-run.ts (start, pause points), job-txn.ts
// (completion, transactions, cancel, dismiss), job-progress.ts, job-events.ts.
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

import { type Ao, type AoHandle, initiateAo } from './ao.ts';
import type { ProgressReport } from './ao-progress.ts';
import { AoError, AoErrorCode } from './errors.ts';
import type { AoEventSink } from './event-queue.ts';
import { type JobEvent, type JobStatusChangeEvent, JobStatusEvents } from './job-events.ts';
import { jobPausePoint, jobSleep, jobStart, jobYield } from './job-run.ts';
import {
  checkSpeed,
  type JobDriverHooks,
  type JobRegistryHooks,
  JobState,
  JobTxnState,
  surface,
} from './job-state.ts';
import { type JobStatus, type JobType, jobVerbAllowed } from './job-tables.ts';
import { jobCancel, jobDoDismiss, jobOnAoAbort, txnDoFinalize } from './job-txn.ts';

/** What a kind of job does (QEMU JobDriver). Only `type` and `run` are required. */
export interface JobDriver extends JobDriverHooks<Job> {
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

const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

/** A transactional group of jobs (QEMU JobTxn): they finalize together, and when one
 * fails, all are cancelled and aborted. */
export class JobTxn {
  readonly registry: JobRegistry;
  /** @internal */
  readonly _state = new JobTxnState<Job>();

  /** @internal use JobRegistry.createTransaction() */
  constructor(registry: JobRegistry) {
    this.registry = registry;
  }

  /** The jobs still in the transaction (a job leaves it when it concludes). */
  get jobs(): readonly Job[] {
    return this._state.jobs.map((s) => s.job);
  }
}

/** A job: the verbs for its user, and what its driver's `run` uses. Its state and the
 * machinery over it are in job-state.ts, job-run.ts and job-txn.ts. */
export class Job {
  readonly id: string;
  readonly type: string;
  readonly driver: JobDriver;
  readonly registry: JobRegistry;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  readonly #s: JobState<Job>;
  /** The transaction the job was created in; `txn` shows it while the state is in it. */
  readonly #txn: JobTxn;

  /** @internal use JobRegistry.createJob() */
  constructor(registry: JobRegistry, options: JobOptions, txn: JobTxn) {
    this.registry = registry;
    this.id = options.id;
    this.driver = options.driver;
    this.type = options.driver.type;
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
    const s = new JobState<Job>(this, this); // from the fields above and the registry
    this.#s = s;
    if (options.speed !== undefined) s.speed = checkSpeed(options.speed);
    initiateAo<void>(
      `job:${this.type}`,
      { callback: () => {} },
      (ao) => {
        s.ao = ao;
      },
      {
        ...(options.signal && { signal: options.signal }),
        ...(options.parent && { parent: options.parent }),
      },
    );
    s.ao.signal.addEventListener('abort', () => jobOnAoAbort(s), { once: true });
    this.#txn = txn;
    s.txn = txn._state;
    // Newest first, as QEMU job_txn_add_job (QLIST_INSERT_HEAD): the order transactions
    // finalize and abort their jobs in.
    txn._state.jobs.unshift(s);
    s.transition('created');
    if (s.ao.aborted) jobOnAoAbort(s);
  }

  // ---- state, as the user and the driver see it ----

  get status(): JobStatus {
    return this.#s.status;
  }

  /** The error the job failed with (also set for cancelled jobs: ERR_VMDISK_AO_JOB_CANCELLED). */
  get error(): Error | undefined {
    return this.#s.error;
  }

  /** The transaction the job is in, until it concludes. */
  get txn(): JobTxn | undefined {
    return this.#s.txn ? this.#txn : undefined;
  }

  /** The job's ao (kind `job:<type>`), live until the job concludes. */
  get ao(): AoHandle<void> {
    return this.#s.ao;
  }

  /** Aborted when the job is force-cancelled; pass it to what the job waits on. */
  get signal(): AbortSignal {
    return this.#s.ao.signal;
  }

  /** The job must stop: it was force-cancelled (QEMU job_is_cancelled). */
  get isCancelled(): boolean {
    return this.#s.forceCancel;
  }

  /** A cancel was requested, forced or not (QEMU job_cancel_requested). */
  get cancelRequested(): boolean {
    return this.#s.cancelled;
  }

  /** The user paused the job (job-pause) and has not resumed it. */
  get userPaused(): boolean {
    return this.#s.userPaused;
  }

  /** The job is at a pause point, waiting to be resumed. */
  get paused(): boolean {
    return this.#s.paused;
  }

  /** The job's body is running, not waiting in a pause point, sleep or yield (QEMU busy). */
  get busy(): boolean {
    return this.#s.busy;
  }

  /** Speed limit set by set-speed (0 = unlimited). */
  get speed(): number {
    return this.#s.speed;
  }

  get progressCurrent(): number {
    return this.#s.progress.current;
  }

  get progressTotal(): number {
    return this.#s.progress.total;
  }

  /** query-jobs entry. */
  info(): JobInfo {
    const s = this.#s;
    const base = {
      id: this.id,
      type: this.type,
      status: s.status,
      'current-progress': s.progress.current,
      'total-progress': s.progress.total,
    };
    return s.error ? { ...base, error: s.error.message } : base;
  }

  /** Progress (current / total) as an async iterator ending when the job concludes. */
  progress(): AsyncIterableIterator<ProgressReport> {
    return this.#s.ao.progress();
  }

  /**
   * Resolves when the job has concluded (or was dismissed before it ran): with nothing
   * on success, rejecting with `job.error` on failure. The promise is made on demand.
   */
  wait(): Promise<void> {
    const s = this.#s;
    return new Promise<void>((resolve, reject) => {
      const settle = (): void => (s.error ? reject(s.error) : resolve());
      if (s.ended) settle();
      else s.endWaiters.push(settle);
    });
  }

  // ---- what the driver's body uses ----

  /** Wakes the job's body if it is waiting in `yield`, `sleep` or a pause point. */
  enter(): void {
    this.#s.enter();
  }

  /**
   * A point where the job may be paused (QEMU job_pause_point): if a pause is pending
   * and the job is not cancelled, the job goes to 'paused' (or 'standby' when 'ready')
   * until resumed or cancelled.
   */
  pausePoint(): Promise<void> {
    return jobPausePoint(this.#s);
  }

  /** Waits until the job is entered (a verb or `enter()`), then passes a pause point. */
  yield(): Promise<void> {
    return jobYield(this.#s);
  }

  /** Sleeps `ms` milliseconds (woken early by a cancel), then passes a pause point. */
  sleep(ms: number): Promise<void> {
    return jobSleep(this.#s, ms);
  }

  /** The job is ready for job-complete (QEMU job_transition_to_ready). */
  transitionToReady(): void {
    this.#s.requireRunning('transitionToReady()');
    this.#s.transition('ready');
  }

  /** Adds `done` to the current progress (QEMU job_progress_update). */
  progressUpdate(done: number): void {
    this.#s.progress.workDone(done);
  }

  /** Total = current + remaining (QEMU job_progress_set_remaining). */
  progressSetRemaining(remaining: number): void {
    this.#s.progress.setRemaining(remaining);
  }

  /** Total += delta (QEMU job_progress_increase_remaining). */
  progressIncreaseRemaining(delta: number): void {
    this.#s.progress.increaseRemaining(delta);
  }

  // ---- drained sections over the job's nodes (not verbs: no table, no user pause) ----

  /**
   * A drained section over the job's nodes began (QEMU child_job_drained_begin ->
   * job_pause): the job pauses at its next pause point, 'paused' (or 'standby' when
   * 'ready'); a job not started, done, or already paused changes nothing. Nests.
   */
  drainedBegin(): void {
    const s = this.#s;
    s.pauseCount++;
    if (!s.paused) s.enter();
  }

  /**
   * Resolves once the job's body runs no code until it is entered again (QEMU
   * child_job_drained_poll): paused, waiting, not started, or done.
   */
  drainedQuiet(): Promise<void> {
    const s = this.#s;
    if (s.quiet) return Promise.resolve();
    return new Promise<void>((resolve) => s.quietWaiters.push(resolve));
  }

  /**
   * The drained section ended (QEMU child_job_drained_end -> job_resume): the last one
   * resumes the job, its status back at once, unless a sleep of its own still runs.
   */
  drainedEnd(): void {
    const s = this.#s;
    if (s.pauseCount <= 0) {
      throw new AoError(AoErrorCode.JOB_STATE, `Job '${this.id}': drainedEnd without drainedBegin`);
    }
    s.pauseCount--;
    if (s.pauseCount === 0 && !s.sleepTimer) s.enter();
  }

  /** Starts the job's body (QEMU job_start); the job goes 'created' -> 'running'. */
  start(): void {
    jobStart(this.#s);
  }

  // ---- verbs (QMP commands): each is checked against JobVerbTable first ----

  /** job-cancel. `force` matters only for drivers with soft cancel (e.g. a ready mirror). */
  cancel(force = false): void {
    this.#s.applyVerb('cancel');
    jobCancel(this.#s, force);
  }

  /** job-pause: the job pauses at its next pause point. */
  pause(): void {
    const s = this.#s;
    s.applyVerb('pause');
    if (s.userPaused) {
      throw new AoError(AoErrorCode.JOB_ALREADY_PAUSED, `Job '${this.id}' is already paused`);
    }
    s.userPaused = true;
    s.pauseCount++;
    if (!s.paused) s.enter();
  }

  /** job-resume. */
  resume(): void {
    const s = this.#s;
    s.applyVerb('resume');
    if (!s.userPaused || s.pauseCount <= 0) {
      throw new AoError(
        AoErrorCode.JOB_NOT_PAUSED,
        `Can't resume job '${this.id}': it was not paused`,
      );
    }
    s.userPaused = false;
    s.pauseCount--;
    if (s.pauseCount === 0 && !s.sleepTimer) s.enter();
  }

  /** block-job-set-speed (0 = unlimited). */
  setSpeed(speed: number): void {
    const s = this.#s;
    s.applyVerb('set-speed');
    s.speed = checkSpeed(speed);
    this.driver.setSpeed?.(this, s.speed);
  }

  /** job-complete: a ready job finishes (driver's `complete`). */
  complete(): void {
    this.#s.applyVerb('complete');
    if (this.#s.cancelled || !this.driver.complete) {
      throw new AoError(
        AoErrorCode.JOB_CANNOT_COMPLETE,
        `The job '${this.id}' cannot be completed`,
      );
    }
    this.driver.complete(this);
  }

  /** job-finalize: finalizes the whole transaction of this pending job. */
  finalize(): void {
    this.#s.applyVerb('finalize');
    const txn = this.#s.txn!;
    if (txn.finalizing || txn.aborting) return;
    surface(txnDoFinalize(txn));
  }

  /** job-dismiss: removes a concluded job. */
  dismiss(): void {
    this.#s.applyVerb('dismiss');
    jobDoDismiss(this.#s);
  }

  /** block-job-change. */
  change(options: unknown): void {
    this.#s.applyVerb('change');
    if (!this.driver.change) {
      throw new AoError(
        AoErrorCode.JOB_CHANGE_UNSUPPORTED,
        `Job '${this.id}' of type '${this.type}' does not support change`,
      );
    }
    this.driver.change(this, options);
  }
}

/** The jobs of one monitor: IDs are unique within a registry. */
export class JobRegistry implements JobRegistryHooks<Job> {
  readonly #jobs = new Map<string, Job>();
  readonly #events: JobStatusEvents;

  /** `events`: an EventQueue (or any sink with push) that also receives every
   * JOB_STATUS_CHANGE event, in order. */
  constructor(options: { events?: AoEventSink<JobStatusChangeEvent | JobEvent> } = {}) {
    this.#events = new JobStatusEvents(options.events);
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
      if (txn._state.aborting || txn._state.finalizing) {
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
    return this.#events.listen(listener);
  }

  /** Queues another event of a job to the events sink, after every event queued before. */
  emitEvent(event: JobEvent): void {
    this.#events.other(event);
  }

  /** @internal */
  _emit(id: string, status: JobStatus): void {
    this.#events.emit(id, status);
  }

  /** @internal */
  _remove(job: Job): void {
    if (this.#jobs.get(job.id) === job) this.#jobs.delete(job.id);
  }
}
