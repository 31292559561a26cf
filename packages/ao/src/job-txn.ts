// How a job ends, after QEMU's job.c: completion (job_completed, job_update_rc), the
// transaction (job_completed_txn_success / _abort, job_do_finalize, job_prepare,
// job_finalize_single), cancel (job_cancel, job_cancel_async), conclude and dismiss.
// Driver hooks may be asynchronous: see the header of job.ts for what that changes.

import { AoError, AoErrorCode } from './errors.ts';
import { type JobState, type JobTxnState, surface, toError } from './job-state.ts';

function jobUpdateRc<J>(s: JobState<J>): void {
  if (!s.error && s.forceCancel) {
    s.error = new AoError(AoErrorCode.JOB_CANCELLED, 'Operation canceled');
  }
  if (s.error) s.transition('aborting');
}

/** The body has returned (or the job was cancelled before it started). */
export async function jobCompleted<J>(s: JobState<J>): Promise<void> {
  jobUpdateRc(s);
  if (s.error) await txnAbort(s.txn!, s);
  else await txnSuccess(s.txn!, s);
}

/** The body has finished (or, not started, the job completed at once). */
async function jobFinishSync<J>(s: JobState<J>): Promise<void> {
  if (s.isCompleted()) return;
  if (!s.started) {
    s.deferred = true;
    jobUpdateRc(s);
    return;
  }
  await s.bodyDone;
}

/** QEMU job_prepare. */
async function jobPrepare<J>(s: JobState<J>): Promise<boolean> {
  if (!s.error && s.driver.prepare) {
    try {
      await s.driver.prepare(s.job);
    } catch (e) {
      s.error = toError(e);
    }
    jobUpdateRc(s);
  }
  return s.error === undefined;
}

/** QEMU job_finalize_single. */
async function jobFinalizeSingle<J>(s: JobState<J>): Promise<void> {
  jobUpdateRc(s);
  const hook = async (fn: ((job: J) => void | Promise<void>) | undefined): Promise<void> => {
    if (!fn) return;
    try {
      await fn.call(s.driver, s.job);
    } catch (e) {
      if (!s.error) s.error = toError(e);
    }
  };
  if (!s.error) await hook(s.driver.commit);
  else await hook(s.driver.abort);
  await hook(s.driver.clean);
  jobLeaveTxn(s);
  jobConclude(s);
}

/** QEMU job_cancel_async. */
function jobCancelAsync<J>(s: JobState<J>, forceIn: boolean): void {
  // A forced cancel stays forced; a soft one is forced unless the driver supports it.
  const force = forceIn || (s.driver.cancel ? s.driver.cancel(s.job, forceIn) : true);
  if (s.userPaused) {
    s.userPaused = false;
    s.pauseCount--;
  }
  if (force || !s.deferred) {
    s.cancelled = true;
    s.forceCancel ||= force;
  }
  if (s.forceCancel && !s.ao.aborted) {
    s.ao.abort(new AoError(AoErrorCode.JOB_CANCELLED, `Job '${s.id}' was cancelled`));
  }
}

function jobLeaveTxn<J>(s: JobState<J>): void {
  const txn = s.txn;
  if (!txn) return;
  const i = txn.jobs.indexOf(s);
  if (i >= 0) txn.jobs.splice(i, 1);
  s.txn = undefined;
}

function jobConclude<J>(s: JobState<J>): void {
  s.transition('concluded');
  jobEnd(s);
  if (s.autoDismiss || !s.started) jobDoDismiss(s);
}

function jobEnd<J>(s: JobState<J>): void {
  if (s.ended) return;
  s.ended = true;
  if (!s.ao.completed) s.ao._settle(s.error ?? null);
  const waiters = s.endWaiters;
  s.endWaiters = [];
  for (const w of waiters) w();
}

/** job-dismiss, once the verb is accepted. */
export function jobDoDismiss<J>(s: JobState<J>): void {
  s.busy = false;
  s.paused = false;
  s.deferred = true;
  jobLeaveTxn(s);
  s.transition('null');
  s.registry._remove(s.job);
  jobEnd(s);
}

/** job-cancel, once the verb is accepted (QEMU job_cancel). */
export function jobCancel<J>(s: JobState<J>, force: boolean): void {
  if (s.status === 'concluded') {
    jobDoDismiss(s);
    return;
  }
  const txn = s.txn!;
  // Too late: the transaction is committing (or aborting already); see job.ts's header.
  if (txn.finalizing) return;
  jobCancelAsync(s, force);
  if (!s.started) {
    s.deferred = true;
    surface(jobCompleted(s));
  } else if (s.deferred) {
    if (s.forceCancel && !txn.finalizing && !txn.aborting) surface(txnAbort(txn, s));
  } else {
    s.enter();
  }
}

export function jobOnAoAbort<J>(s: JobState<J>): void {
  // The caller's signal or the parent ao aborted the job's ao: a forced cancel, unless
  // the job is already past the point where a cancel means anything.
  if (s.forceCancel) return;
  const st = s.status;
  if (st === 'aborting' || st === 'concluded' || st === 'null') return;
  jobCancel(s, true);
}

// ---- transactions (QEMU job_completed_txn_success / _abort, job_do_finalize) ----

async function txnSuccess<J>(txn: JobTxnState<J>, job: JobState<J>): Promise<void> {
  job.transition('waiting');
  if (txn.aborting) return;
  if (txn.jobs.some((other) => !other.isCompleted())) return;
  for (const other of [...txn.jobs]) other.transition('pending');
  if (txn.jobs.every((other) => other.autoFinalize)) await txnDoFinalize(txn);
}

/** job-finalize for the whole transaction (QEMU job_do_finalize). */
export async function txnDoFinalize<J>(txn: JobTxnState<J>): Promise<void> {
  txn.finalizing = true;
  try {
    let failed: JobState<J> | undefined;
    for (const other of [...txn.jobs]) {
      if (!(await jobPrepare(other))) {
        failed = other;
        break;
      }
    }
    if (failed) {
      txn.finalizing = false;
      // The job whose prepare failed is the one not cancelled: every other aborts too,
      // the last to complete included, whatever its own prepare did.
      await txnAbort(txn, failed);
      return;
    }
    for (const other of [...txn.jobs]) await jobFinalizeSingle(other);
  } finally {
    txn.finalizing = false;
  }
}

async function txnAbort<J>(txn: JobTxnState<J>, job: JobState<J>): Promise<void> {
  if (txn.aborting) return;
  txn.aborting = true;
  for (const other of [...txn.jobs]) {
    // One failure decides the transaction: cancel the others as fast as possible.
    if (other !== job) jobCancelAsync(other, true);
  }
  for (const other of [...txn.jobs]) other.enter();
  while (txn.jobs.length > 0) {
    const other = txn.jobs[0]!;
    await jobFinishSync(other);
    await jobFinalizeSingle(other);
  }
}
