// Jobs: life cycle, pause points, ready/complete, soft and forced cancel, auto-finalize
// and auto-dismiss, transactions, JOB_STATUS_CHANGE events, query-jobs, progress.
import { stat } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  EventQueue,
  type Job,
  JobRegistry,
  type JobStatusChangeEvent,
  liveAos,
  runAo,
} from '../src/index.ts';
import { deferred, turn, turns, until } from './helpers.ts';
import { control, historyOf, recordingRegistry, scriptedDriver } from './job-harness.ts';

async function ended(job: Job): Promise<void> {
  await job.wait().catch(() => {});
  await turns(2);
}

describe('a job on its own', () => {
  it('runs created -> running -> waiting -> pending -> concluded -> null and commits', async () => {
    const { registry, events } = recordingRegistry();
    const ctl = control();
    const job = registry.createJob({ id: 'job0', driver: scriptedDriver(ctl, 'create') });
    expect(job.status).toBe('created');
    expect(registry.query()).toEqual([
      { id: 'job0', type: 'create', status: 'created', 'current-progress': 0, 'total-progress': 0 },
    ]);
    job.start();
    await until(() => job.status === 'running', 'running');
    ctl.finish = true;
    job.enter();
    await job.wait();
    await turns(2);
    expect(historyOf(events, 'job0')).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
    expect(ctl.calls).toEqual(['prepare', 'commit', 'clean']);
    expect(job.error).toBeUndefined();
    expect(registry.query()).toEqual([]);
    expect(registry.find('job0')).toBeUndefined();
    expect(job.ao.completed).toBe(true);
  });

  it('a failing body aborts: running -> aborting -> concluded, error in query-jobs', async () => {
    const { registry, events } = recordingRegistry();
    const ctl = control({ finish: true, fail: true });
    const job = registry.createJob({
      id: 'bad',
      driver: scriptedDriver(ctl),
      autoDismiss: false,
    });
    job.start();
    await expect(job.wait()).rejects.toThrow('job bad failed');
    expect(job.status).toBe('concluded');
    expect(registry.query()).toEqual([
      {
        id: 'bad',
        type: 'backup',
        status: 'concluded',
        'current-progress': 0,
        'total-progress': 0,
        error: 'job bad failed',
      },
    ]);
    expect(ctl.calls).toEqual(['abort', 'clean']);
    job.dismiss();
    await turns(2);
    expect(historyOf(events, 'bad')).toEqual([
      'created',
      'running',
      'aborting',
      'concluded',
      'null',
    ]);
  });

  it('without auto-finalize waits in pending for job-finalize; without auto-dismiss in concluded', async () => {
    const { registry } = recordingRegistry();
    const ctl = control({ finish: true });
    const job = registry.createJob({
      id: 'manual',
      driver: scriptedDriver(ctl),
      autoFinalize: false,
      autoDismiss: false,
    });
    job.start();
    await until(() => job.status === 'pending', 'pending');
    await turns(3);
    expect(job.status).toBe('pending');
    expect(ctl.calls).toEqual([]);
    job.finalize();
    await job.wait();
    expect(job.status).toBe('concluded');
    expect(ctl.calls).toEqual(['prepare', 'commit', 'clean']);
    expect(registry.get('manual')).toBe(job);
    job.dismiss();
    expect(job.status).toBe('null');
    expect(() => registry.get('manual')).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_NOT_FOUND' }),
    );
  });

  it('a job that is never started shows up as a live ao until it is cancelled', async () => {
    const registry = new JobRegistry();
    const ctl = control();
    const job = registry.createJob({ id: 'idle', driver: scriptedDriver(ctl) });
    expect(liveAos().map((a) => a.kind)).toEqual(['job:backup']);
    job.cancel();
    await until(() => job.status === 'null', 'dismissed');
    expect(ctl.runs).toBe(0);
    expect(job.error).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
    await expect(job.wait()).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });
});

describe('pause points', () => {
  it('pause takes effect at the next pause point; resume continues', async () => {
    const { registry, events } = recordingRegistry();
    const steps: number[] = [];
    const job = registry.createJob({
      id: 'stepper',
      driver: {
        type: 'stream',
        async run(job) {
          for (let i = 0; i < 5; i++) {
            steps.push(i);
            await job.pausePoint();
            await new Promise((r) => setImmediate(r));
          }
        },
      },
    });
    job.pause();
    expect(job.userPaused).toBe(true);
    job.start();
    // Paused before its body did anything (QEMU: a pause point before run()).
    await until(() => job.status === 'paused', 'paused at the first pause point');
    expect(steps).toEqual([]);
    expect(() => job.pause()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_ALREADY_PAUSED' }),
    );
    job.resume();
    expect(() => job.resume()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_NOT_PAUSED' }),
    );
    await until(() => steps.length >= 1, 'one step');
    job.pause();
    await until(() => job.status === 'paused', 'paused again');
    const at = steps.length;
    await turns(5);
    expect(steps.length).toBe(at);
    job.resume();
    await job.wait();
    expect(steps).toEqual([0, 1, 2, 3, 4]);
    await turns(2);
    const history = historyOf(events, 'stepper');
    expect(history.slice(0, 4)).toEqual(['created', 'running', 'paused', 'running']);
    expect(history.filter((s) => s === 'paused')).toHaveLength(2);
  });

  it('a ready job pauses into standby, and job-complete finishes it', async () => {
    const { registry, events } = recordingRegistry();
    const ctl = control({ goReady: true });
    const job = registry.createJob({ id: 'mirror0', driver: scriptedDriver(ctl, 'mirror') });
    expect(() => job.complete()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_VERB_REFUSED' }),
    );
    job.start();
    await until(() => job.status === 'ready', 'ready');
    await turn();
    job.pause();
    await until(() => job.status === 'standby', 'standby');
    job.resume();
    await until(() => job.status === 'ready', 'ready again');
    await turn();
    job.complete();
    await job.wait();
    await turns(2);
    expect(historyOf(events, 'mirror0')).toEqual([
      'created',
      'running',
      'ready',
      'standby',
      'ready',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
  });

  it('job-complete needs a driver that can complete', async () => {
    const registry = new JobRegistry();
    const job = registry.createJob({
      id: 'nocomplete',
      driver: {
        type: 'commit',
        async run(job) {
          job.transitionToReady();
          while (!job.isCancelled) await job.yield();
        },
      },
    });
    job.start();
    await until(() => job.status === 'ready', 'ready');
    expect(() => job.complete()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_CANNOT_COMPLETE' }),
    );
    job.cancel();
    await ended(job);
  });

  it('sleep() returns after its delay when nothing wakes the job', async () => {
    const registry = new JobRegistry();
    let slept = 0;
    const job = registry.createJob({
      id: 'napper',
      driver: {
        type: 'backup',
        async run(job) {
          for (let i = 0; i < 3; i++) {
            await job.sleep(1);
            slept++;
          }
        },
      },
    });
    job.start();
    await job.wait();
    expect(slept).toBe(3);
  });

  it('sleep(0) lets the event loop run once, without waiting for a timer', async () => {
    // From an I/O callback Node runs immediates before timers (its documented order): a
    // sleep of 0 that waited on a 0 ms timer (1 ms in Node) came after the test's timer.
    const registry = new JobRegistry();
    const order: string[] = [];
    const job = registry.createJob({
      id: 'yielder',
      driver: {
        type: 'stream',
        async run(job) {
          await new Promise((resolve) => stat('.', resolve));
          setTimeout(() => order.push('timer'), 0);
          await job.sleep(0);
          order.push('slept');
        },
      },
    });
    job.start();
    await job.wait();
    await until(() => order.length === 2, 'the timer');
    expect(order).toEqual(['slept', 'timer']);
  });

  it('sleep() is woken early by a cancel', async () => {
    const registry = new JobRegistry();
    const job = registry.createJob({
      id: 'sleeper',
      driver: {
        type: 'backup',
        async run(job) {
          await job.sleep(60_000);
        },
      },
    });
    job.start();
    await until(() => job.status === 'running', 'running');
    await turns(2);
    job.cancel();
    await expect(job.wait()).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });
});

describe('cancel', () => {
  it('forced: the body sees isCancelled and an aborted signal; the job ends cancelled', async () => {
    const { registry, events } = recordingRegistry();
    let sawSignal = false;
    const job = registry.createJob({
      id: 'cancel-me',
      driver: {
        type: 'backup',
        async run(job) {
          if (!job.signal.aborted) {
            await new Promise<void>((resolve) =>
              job.signal.addEventListener('abort', () => resolve(), { once: true }),
            );
          }
          sawSignal = job.signal.aborted;
          if (job.isCancelled) throw new Error('stopped');
        },
      },
    });
    job.start();
    await until(() => job.status === 'running', 'running');
    await turns(2);
    job.cancel(true);
    expect(job.isCancelled).toBe(true);
    expect(job.cancelRequested).toBe(true);
    await expect(job.wait()).rejects.toThrow('stopped');
    await turns(2);
    expect(sawSignal).toBe(true);
    expect(historyOf(events, 'cancel-me')).toEqual([
      'created',
      'running',
      'aborting',
      'concluded',
      'null',
    ]);
  });

  it('a paused job is resumed by cancel', async () => {
    const registry = new JobRegistry();
    const ctl = control();
    const job = registry.createJob({ id: 'p', driver: scriptedDriver(ctl) });
    job.start();
    await until(() => job.status === 'running', 'running');
    job.pause();
    await until(() => job.status === 'paused', 'paused');
    job.cancel();
    expect(job.userPaused).toBe(false);
    await expect(job.wait()).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });

  it('soft: a driver that supports it may finish normally (mirror without pivot)', async () => {
    const { registry } = recordingRegistry();
    const ctl = control({ goReady: true });
    const base = scriptedDriver(ctl, 'mirror');
    const job = registry.createJob({
      id: 'soft',
      driver: {
        ...base,
        cancel(job, force) {
          if (force || job.status !== 'ready') return true;
          ctl.finish = true;
          return false;
        },
      },
    });
    job.start();
    await until(() => job.status === 'ready', 'ready');
    await turn();
    job.cancel(false);
    expect(job.cancelRequested).toBe(true);
    expect(job.isCancelled).toBe(false);
    expect(job.signal.aborted).toBe(false);
    await job.wait();
    expect(job.error).toBeUndefined();
    expect(ctl.calls).toEqual(['prepare', 'commit', 'clean']);
  });

  it("the caller's signal force-cancels the job", async () => {
    const registry = new JobRegistry();
    const ac = new AbortController();
    const job = registry.createJob({
      id: 's',
      driver: scriptedDriver(control()),
      signal: ac.signal,
    });
    job.start();
    await until(() => job.status === 'running', 'running');
    ac.abort('shutdown');
    expect(job.isCancelled).toBe(true);
    await expect(job.wait()).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });

  it('a job nested in an ao is cancelled when the ao is aborted', async () => {
    const registry = new JobRegistry();
    let job: Job | undefined;
    const p = runAo('command', undefined, async (ao) => {
      job = registry.createJob({ id: 'nested', driver: scriptedDriver(control()), parent: ao });
      job.start();
      await job.wait().catch(() => {});
      return job.error;
    });
    await until(() => job?.status === 'running', 'running');
    p.ao.abort('stop');
    await expect(p).resolves.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });
});

describe('transactions', () => {
  it('jobs finalize together: the first done waits until the last is done', async () => {
    const { registry, events } = recordingRegistry();
    const txn = registry.createTransaction();
    const ctls = [control(), control(), control()];
    const jobs = ctls.map((ctl, i) =>
      registry.createJob({ id: `t${i}`, driver: scriptedDriver(ctl), txn }),
    );
    expect(txn.jobs).toHaveLength(3);
    for (const j of jobs) j.start();
    await until(() => jobs.every((j) => j.status === 'running'), 'all running');
    await turn();
    ctls[0]!.finish = true;
    jobs[0]!.enter();
    ctls[1]!.finish = true;
    jobs[1]!.enter();
    await until(() => jobs[1]!.status === 'waiting' && jobs[0]!.status === 'waiting', 'waiting');
    await turns(3);
    expect(jobs[0]!.status).toBe('waiting');
    expect(ctls.flatMap((c) => c.calls)).toEqual([]);
    ctls[2]!.finish = true;
    jobs[2]!.enter();
    await Promise.all(jobs.map((j) => j.wait()));
    await turns(2);
    for (let i = 0; i < 3; i++) {
      expect(ctls[i]!.calls).toEqual(['prepare', 'commit', 'clean']);
      expect(historyOf(events, `t${i}`)).toEqual([
        'created',
        'running',
        'waiting',
        'pending',
        'concluded',
        'null',
      ]);
    }
    expect(txn.jobs).toEqual([]);
  });

  it('one failure aborts them all, including jobs already waiting', async () => {
    const { registry, events } = recordingRegistry();
    const txn = registry.createTransaction();
    const ctls = [control(), control(), control()];
    const jobs = ctls.map((ctl, i) =>
      registry.createJob({ id: `f${i}`, driver: scriptedDriver(ctl), txn }),
    );
    for (const j of jobs) j.start();
    await until(() => jobs.every((j) => j.status === 'running'), 'all running');
    await turn();
    ctls[0]!.finish = true;
    jobs[0]!.enter();
    await until(() => jobs[0]!.status === 'waiting', 'first waiting');
    ctls[1]!.fail = true;
    ctls[1]!.finish = true;
    jobs[1]!.enter();
    const results = await Promise.allSettled(jobs.map((j) => j.wait()));
    await turns(2);
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected', 'rejected']);
    expect(jobs[1]!.error?.message).toBe('job f1 failed');
    expect(jobs[0]!.error).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
    expect(jobs[2]!.error).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
    for (const c of ctls) expect(c.calls).toEqual(['abort', 'clean']);
    expect(jobs[2]!.signal.aborted).toBe(true);
    expect(historyOf(events, 'f0')).toEqual([
      'created',
      'running',
      'waiting',
      'aborting',
      'concluded',
      'null',
    ]);
    expect(historyOf(events, 'f2')).toEqual([
      'created',
      'running',
      'aborting',
      'concluded',
      'null',
    ]);
  });

  it('a failing prepare aborts the whole transaction', async () => {
    const registry = new JobRegistry();
    const txn = registry.createTransaction();
    const ctls = [control({ finish: true }), control({ finish: true })];
    const drivers = ctls.map((c) => scriptedDriver(c));
    // The jobs prepare newest first (QEMU's order): p1 prepares, then p0 refuses.
    drivers[0] = {
      ...drivers[0]!,
      prepare: () => {
        throw new Error('graph change refused');
      },
    };
    const jobs = drivers.map((driver, i) => registry.createJob({ id: `p${i}`, driver, txn }));
    for (const j of jobs) j.start();
    const results = await Promise.allSettled(jobs.map((j) => j.wait()));
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(jobs[0]!.error?.message).toBe('graph change refused');
    expect(ctls[1]!.calls).toEqual(['prepare', 'abort', 'clean']);
    expect(ctls[1]!.calls).not.toContain('commit');
    expect(ctls[0]!.calls).toEqual(['abort', 'clean']);
  });

  it('cancelling one job of a transaction cancels the others', async () => {
    const registry = new JobRegistry();
    const txn = registry.createTransaction();
    const jobs = [0, 1].map((i) =>
      registry.createJob({ id: `c${i}`, driver: scriptedDriver(control()), txn }),
    );
    for (const j of jobs) j.start();
    await until(() => jobs.every((j) => j.status === 'running'), 'running');
    jobs[0]!.cancel();
    const results = await Promise.allSettled(jobs.map((j) => j.wait()));
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(jobs[1]!.isCancelled).toBe(true);
  });

  it('a cancel while the transaction commits comes too late and changes nothing', async () => {
    const registry = new JobRegistry();
    const gate = deferred();
    const ctl = control({ finish: true });
    const committing = deferred();
    const job = registry.createJob({
      id: 'late',
      driver: {
        ...scriptedDriver(ctl),
        async commit() {
          committing.resolve();
          await gate.promise;
          ctl.calls.push('commit');
        },
      },
    });
    job.start();
    await committing.promise;
    expect(job.status).toBe('pending');
    job.cancel();
    expect(job.cancelRequested).toBe(false);
    gate.resolve();
    await job.wait();
    expect(job.error).toBeUndefined();
    expect(ctl.calls).toEqual(['prepare', 'commit', 'clean']);
  });

  it('a member never started is cancelled and dismissed when another fails', async () => {
    const { registry, events } = recordingRegistry();
    const txn = registry.createTransaction();
    const idle = control();
    const waiting = registry.createJob({ id: 'n0', driver: scriptedDriver(idle), txn });
    const failing = registry.createJob({
      id: 'n1',
      driver: {
        type: 'stream',
        run() {
          throw new Error('synchronous failure');
        },
      },
      txn,
    });
    failing.start();
    await expect(failing.wait()).rejects.toThrow('synchronous failure');
    await expect(waiting.wait()).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
    await turns(2);
    expect(idle.runs).toBe(0);
    expect(idle.calls).toEqual(['abort', 'clean']);
    expect(historyOf(events, 'n0')).toEqual(['created', 'aborting', 'concluded', 'null']);
  });

  it('refuses a transaction of another registry', () => {
    const a = new JobRegistry();
    const b = new JobRegistry();
    expect(() =>
      b.createJob({ id: 'x', driver: scriptedDriver(control()), txn: a.createTransaction() }),
    ).toThrow(expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_TXN' }));
  });
});

describe('events, query and options', () => {
  it('JOB_STATUS_CHANGE events go to an EventQueue in QMP shape, after the change', async () => {
    const queue = new EventQueue<JobStatusChangeEvent>();
    const registry = new JobRegistry({ events: queue });
    const job = registry.createJob({
      id: 'evt',
      driver: scriptedDriver(control({ finish: true })),
    });
    expect(queue.check()).toBeUndefined();
    job.start();
    await job.wait();
    await turns(2);
    const got: JobStatusChangeEvent[] = [];
    for (let e = queue.check(); e; e = queue.check()) got.push(e);
    expect(got[0]).toEqual({ event: 'JOB_STATUS_CHANGE', data: { id: 'evt', status: 'created' } });
    expect(got.map((e) => e.data.status)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
  });

  it('any sink with push can take the events (e.g. a QMP forwarder)', async () => {
    const forwarded: { event: string; data: unknown; timestamp: number }[] = [];
    const registry = new JobRegistry({
      events: { push: (e) => forwarded.push({ ...e, timestamp: forwarded.length }) },
    });
    const job = registry.createJob({ id: 'fwd', driver: scriptedDriver(control()) });
    job.cancel();
    await ended(job);
    expect(forwarded.map((e) => e.data)).toEqual([
      { id: 'fwd', status: 'created' },
      { id: 'fwd', status: 'aborting' },
      { id: 'fwd', status: 'concluded' },
      { id: 'fwd', status: 'null' },
    ]);
    expect(() => new JobRegistry({ events: {} as EventQueue<JobStatusChangeEvent> })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
  });

  it('unsubscribed listeners get nothing more', async () => {
    const registry = new JobRegistry();
    const seen: string[] = [];
    const off = registry.onStatusChange((e) => seen.push(e.data.status));
    const job = registry.createJob({ id: 'u', driver: scriptedDriver(control()) });
    await turn();
    off();
    job.cancel();
    await ended(job);
    expect(seen).toEqual(['created']);
  });

  it('validates IDs (QEMU id_wellformed), uniqueness, drivers and speed', () => {
    const registry = new JobRegistry();
    const driver = scriptedDriver(control());
    for (const id of ['', '1abc', 'a b', 'a/b', '-x']) {
      expect(() => registry.createJob({ id, driver })).toThrow(
        expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_ID_INVALID' }),
      );
    }
    const job = registry.createJob({ id: 'ok-1.x_y', driver });
    expect(() => registry.createJob({ id: 'ok-1.x_y', driver })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_ID_IN_USE' }),
    );
    expect(() =>
      registry.createJob({ id: 'nodriver', driver: { type: 'x' } as unknown as typeof driver }),
    ).toThrow(expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }));
    expect(() => job.setSpeed(-1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
    expect(() => job.setSpeed(1.5)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
    expect(() => job.start()).not.toThrow();
    expect(() => job.start()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_ALREADY_STARTED' }),
    );
    job.cancel();
    return ended(job);
  });

  it('set-speed and change reach the driver; change without support is refused', async () => {
    const registry = new JobRegistry();
    const ctl = control();
    const job = registry.createJob({ id: 'spd', driver: scriptedDriver(ctl), speed: 10 });
    expect(job.speed).toBe(10);
    job.setSpeed(4096);
    expect(job.speed).toBe(4096);
    expect(ctl.speed).toBe(4096);
    job.change({ 'copy-mode': 'write-blocking' });
    expect(ctl.changed).toEqual({ 'copy-mode': 'write-blocking' });
    const plain = registry.createJob({
      id: 'plain',
      driver: { type: 'stream', run: () => {} },
    });
    expect(() => plain.change({})).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_CHANGE_UNSUPPORTED' }),
    );
    job.cancel();
    plain.cancel();
    await ended(job);
    await ended(plain);
  });

  it('progress: current / total in query-jobs and as an iterator', async () => {
    const registry = new JobRegistry();
    const step = deferred();
    const job = registry.createJob({
      id: 'prog',
      driver: {
        type: 'create',
        async run(job) {
          job.progressSetRemaining(100);
          job.progressUpdate(40);
          await step.promise;
          job.progressIncreaseRemaining(50);
          job.progressUpdate(110);
        },
      },
    });
    const reports: [number, number][] = [];
    const consumer = (async () => {
      for await (const r of job.progress()) {
        reports.push([r.done, r.total]);
      }
    })();
    job.start();
    await until(() => job.progressCurrent === 40, 'progress 40');
    expect(registry.query()[0]).toMatchObject({ 'current-progress': 40, 'total-progress': 100 });
    await until(() => reports.length > 0, 'a report');
    step.resolve();
    await job.wait();
    await consumer;
    // A waiting consumer gets a report as soon as it is made; later ones are coalesced.
    expect(reports[0]).toEqual([0, 100]);
    expect(reports.at(-1)).toEqual([150, 150]);
    for (let i = 1; i < reports.length; i++) {
      expect(reports[i]![0]).toBeGreaterThanOrEqual(reports[i - 1]![0]);
    }
    expect(() => job.progressUpdate(-1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
  });

  it('cancelAll() ends every job, whatever its status, and empties the registry', async () => {
    const registry = new JobRegistry();
    const created = registry.createJob({ id: 'a', driver: scriptedDriver(control()) });
    const running = registry.createJob({ id: 'b', driver: scriptedDriver(control()) });
    const paused = registry.createJob({ id: 'c', driver: scriptedDriver(control()) });
    const pending = registry.createJob({
      id: 'd',
      driver: scriptedDriver(control({ finish: true })),
      autoFinalize: false,
    });
    const concluded = registry.createJob({
      id: 'e',
      driver: scriptedDriver(control({ finish: true })),
      autoDismiss: false,
    });
    for (const j of [running, paused, pending, concluded]) j.start();
    paused.pause();
    await until(
      () =>
        paused.status === 'paused' &&
        pending.status === 'pending' &&
        concluded.status === 'concluded',
      'staged',
    );
    await registry.cancelAll();
    expect(registry.query()).toEqual([]);
    for (const j of [created, running, paused, pending, concluded]) expect(j.status).toBe('null');
    expect(concluded.error).toBeUndefined();
    expect(pending.error).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_CANCELLED' });
  });

  it('job-internal calls are refused outside the running body', () => {
    const registry = new JobRegistry();
    const job = registry.createJob({ id: 'outside', driver: scriptedDriver(control()) });
    expect(() => job.transitionToReady()).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_JOB_STATE' }),
    );
    return expect(job.pausePoint())
      .rejects.toMatchObject({ code: 'ERR_VMDISK_AO_JOB_STATE' })
      .then(() => {
        job.cancel();
        return ended(job);
      });
  });
});
