// Jobs in drained sections (QEMU child_job_drained_begin / _poll / _end): the job pauses at
// its next pause point without being paused by the user, the drain waits until its body is
// quiet, and the last end resumes it at once.
import { describe, expect, it } from 'vitest';
import type { Job } from '../src/index.ts';
import { deferred, turn, turns, until } from './helpers.ts';
import { control, historyOf, recordingRegistry, scriptedDriver, stage } from './job-harness.ts';

/** A job whose body sleeps long between steps, as a rate-limited copy does. */
function sleeper(registry: ReturnType<typeof recordingRegistry>['registry'], id: string): Job {
  return registry.createJob({
    id,
    driver: {
      type: 'stream',
      async run(job) {
        while (!job.isCancelled) await job.sleep(3_600_000);
      },
    },
  });
}

describe('drained sections over a job', () => {
  it('a sleeping job pauses, the drain waits for it, and the end resumes it before returning', async () => {
    const { registry, events } = recordingRegistry();
    const job = sleeper(registry, 's');
    job.start();
    await until(() => !job.busy, 'asleep');
    job.drainedBegin();
    await job.drainedQuiet();
    expect(job.status).toBe('paused');
    expect(job.userPaused).toBe(false);
    job.drainedEnd();
    // The status is back on the stack of drainedEnd (its event before a QMP reply).
    expect(job.status).toBe('running');
    await turns(2);
    expect(historyOf(events, 's')).toEqual(['created', 'running', 'paused', 'running']);
    job.cancel(true);
    await job.wait().catch(() => {});
  });

  it('a busy job is quiet only once its body reaches a pause point', async () => {
    const { registry, events } = recordingRegistry();
    const step = deferred();
    const job = registry.createJob({
      id: 'b',
      driver: {
        type: 'stream',
        async run(job) {
          await step.promise; // I/O in flight: no pause point until it is done
          await job.pausePoint();
        },
      },
    });
    job.start();
    await until(() => job.busy && job.status === 'running', 'running');
    job.drainedBegin();
    let quiet = false;
    const waiting = job.drainedQuiet().then(() => {
      quiet = true;
    });
    await turns(3);
    expect(quiet).toBe(false);
    step.resolve();
    await waiting;
    expect(job.status).toBe('paused');
    job.drainedEnd();
    await job.wait();
    await turns(2);
    expect(historyOf(events, 'b')).toEqual([
      'created',
      'running',
      'paused',
      'running',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
  });

  it('a ready job goes to standby and back; sections nest', async () => {
    const { registry, events } = recordingRegistry();
    const ctl = control({ goReady: true });
    const job = registry.createJob({ id: 'm', driver: scriptedDriver(ctl, 'mirror') });
    job.start();
    await until(() => job.status === 'ready', 'ready');
    await turn();
    job.drainedBegin();
    job.drainedBegin();
    await job.drainedQuiet();
    expect(job.status).toBe('standby');
    job.drainedEnd();
    expect(job.status).toBe('standby');
    job.drainedEnd();
    expect(job.status).toBe('ready');
    expect(() => job.drainedEnd()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_STATE' }),
    );
    job.complete();
    await job.wait();
    await turns(2);
    expect(historyOf(events, 'm').slice(0, 5)).toEqual([
      'created',
      'running',
      'ready',
      'standby',
      'ready',
    ]);
  });

  it('a job paused by the user stays paused, without a status change, until resumed', async () => {
    const { registry, events } = recordingRegistry();
    const job = sleeper(registry, 'u');
    job.start();
    await until(() => !job.busy, 'asleep');
    job.pause();
    await until(() => job.status === 'paused', 'paused');
    job.drainedBegin();
    await job.drainedQuiet();
    job.drainedEnd();
    expect(job.status).toBe('paused');
    job.resume();
    expect(job.status).toBe('running');
    await turns(2);
    expect(historyOf(events, 'u')).toEqual(['created', 'running', 'paused', 'running']);
    job.cancel(true);
    await job.wait().catch(() => {});
  });

  it('a job not started, or done with its work, is quiet and changes nothing', async () => {
    const { registry, events } = recordingRegistry();
    const created = registry.createJob({ id: 'c', driver: scriptedDriver(control()) });
    const { job: pending, release } = await stage(registry, 'pending', 'p');
    for (const job of [created, pending]) {
      const before = job.status;
      job.drainedBegin();
      await job.drainedQuiet();
      job.drainedEnd();
      expect(job.status).toBe(before);
    }
    await turns(2);
    expect(historyOf(events, 'c')).toEqual(['created']);
    expect(historyOf(events, 'p').at(-1)).toBe('pending');
    // A job started after a drained section runs as any other.
    created.start();
    await until(() => created.status === 'running', 'running');
    created.cancel(true);
    release();
    pending.finalize();
    await Promise.all([created.wait().catch(() => {}), pending.wait()]);
  });
});
