// How a job runs, after QEMU's job.c: job_start and job_co_entry run the driver's body;
// the body waits in pause points (job_pause_point), job_yield and job_sleep_ns, and is
// woken by JobState.enter (job_enter).

import { defer } from './defer.ts';
import { AoError, AoErrorCode } from './errors.ts';
import { type JobState, surface, toError } from './job-state.ts';
import { jobCompleted } from './job-txn.ts';

/** QEMU job_pause_point; see Job.pausePoint. */
export function jobPausePoint<J>(s: JobState<J>): Promise<void> {
  try {
    s.requireRunning('pausePoint()');
  } catch (err) {
    return Promise.reject(err);
  }
  // Nothing to pause for (the common case, once per unit of a job's work): no async frame.
  if (s.pauseCount === 0 || s.forceCancel) return NOTHING;
  return pauseHere(s);
}

const NOTHING = Promise.resolve();

async function pauseHere<J>(s: JobState<J>): Promise<void> {
  const status = s.status;
  s.transition(status === 'ready' ? 'standby' : 'paused');
  s.paused = true;
  s.onResume = () => {
    s.paused = false;
    s.transition(status);
  };
  await s.doYield();
}

/** QEMU job_yield; see Job.yield. */
export async function jobYield<J>(s: JobState<J>): Promise<void> {
  s.requireRunning('yield()');
  if (s.forceCancel) return;
  if (s.pauseCount === 0) await s.doYield();
  await jobPausePoint(s);
}

/** QEMU job_sleep_ns; see Job.sleep. */
export async function jobSleep<J>(s: JobState<J>, ms: number): Promise<void> {
  s.requireRunning('sleep()');
  if (!Number.isFinite(ms) || ms < 0) {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, `sleep() takes milliseconds >= 0, not ${ms}`);
  }
  if (s.forceCancel) return;
  if (s.pauseCount === 0) await s.doYield(ms);
  await jobPausePoint(s);
}

/** QEMU job_start: the job goes 'created' -> 'running' and its body starts (later). */
export function jobStart<J>(s: JobState<J>): void {
  if (s.started || s.status !== 'created') {
    throw new AoError(
      AoErrorCode.JOB_ALREADY_STARTED,
      `Job '${s.id}' in state '${s.status}' cannot be started`,
    );
  }
  s.started = true;
  s.pauseCount--;
  s.busy = true;
  s.paused = false;
  s.transition('running');
  s.bodyDone = new Promise<void>((resolve) => {
    defer(() => surface(jobCoEntry(s).then(resolve)));
  });
}

async function jobCoEntry<J>(s: JobState<J>): Promise<void> {
  await jobPausePoint(s);
  let err: Error | undefined;
  try {
    await s.driver.run(s.job);
  } catch (e) {
    err = toError(e);
  }
  if (err && !s.error) s.error = err;
  s.deferred = true;
  s.busy = true;
  s.notifyQuiet();
  s.clearSleep();
  await jobCompleted(s);
}
