// A scripted job driver and a way to bring a real job into any reachable status, for the
// table tests and the job tests.
import {
  type Job,
  type JobDriver,
  type JobOptions,
  JobRegistry,
  type JobStatus,
  type JobStatusChangeEvent,
} from '../src/index.ts';
import { deferred, turn, until } from './helpers.ts';

/** What a test can tell a scripted job to do, and what the job's hooks recorded. */
export interface Control {
  goReady: boolean;
  finish: boolean;
  fail: boolean;
  /** While set, the driver's abort hook waits on it (holds the job in 'aborting'). */
  abortGate?: Promise<void>;
  calls: string[];
  runs: number;
  speed?: number;
  changed?: unknown;
}

export function control(init: Partial<Control> = {}): Control {
  return { goReady: false, finish: false, fail: false, calls: [], runs: 0, ...init };
}

/** A driver whose body loops on `job.yield()` until told to finish or cancelled. */
export function scriptedDriver(ctl: Control, type = 'backup'): JobDriver {
  return {
    type,
    async run(job: Job) {
      ctl.runs++;
      while (!job.isCancelled) {
        if (ctl.goReady && job.status === 'running') job.transitionToReady();
        if (ctl.finish) break;
        await job.yield();
      }
      if (ctl.fail) throw new Error(`job ${job.id} failed`);
    },
    prepare: () => {
      ctl.calls.push('prepare');
    },
    commit: () => {
      ctl.calls.push('commit');
    },
    async abort() {
      ctl.calls.push('abort');
      if (ctl.abortGate) await ctl.abortGate;
    },
    clean: () => {
      ctl.calls.push('clean');
    },
    complete(job: Job) {
      ctl.finish = true;
      if (!job.paused) job.enter();
    },
    setSpeed(_job: Job, speed: number) {
      ctl.speed = speed;
    },
    change(_job: Job, options: unknown) {
      ctl.changed = options;
    },
  };
}

/** A registry that records every status change it emits, per job. */
export function recordingRegistry(): { registry: JobRegistry; events: JobStatusChangeEvent[] } {
  const registry = new JobRegistry();
  const events: JobStatusChangeEvent[] = [];
  registry.onStatusChange((e) => events.push(e));
  return { registry, events };
}

/** The statuses each job went through, from the recorded events. */
export function historyOf(events: JobStatusChangeEvent[], id: string): JobStatus[] {
  return events.filter((e) => e.data.id === id).map((e) => e.data.status);
}

export interface Staged {
  job: Job;
  ctl: Control;
  /** Other jobs created to reach the status (the transaction partner for 'waiting'). */
  others: { job: Job; ctl: Control }[];
  /** Releases whatever holds the jobs, so that `drain` can end them. */
  release(): void;
}

/** Waits until the job's body is waiting in yield (not busy) with the given status. */
async function settle(job: Job, status: JobStatus): Promise<void> {
  await until(() => job.status === status, `job ${job.id} reaches '${status}'`);
  // Let the body reach its yield point.
  await turn();
  await turn();
}

/** Creates a job and brings it to `status` (every status but 'undefined' is reachable). */
export async function stage(
  registry: JobRegistry,
  status: Exclude<JobStatus, 'undefined'>,
  id: string,
): Promise<Staged> {
  const ctl = control();
  const others: Staged['others'] = [];
  const opts: { autoFinalize?: boolean; autoDismiss?: boolean } = {};
  const gate = deferred();
  let release = (): void => {};
  switch (status) {
    case 'pending':
      opts.autoFinalize = false;
      break;
    case 'concluded':
      opts.autoDismiss = false;
      break;
    case 'aborting':
      ctl.abortGate = gate.promise;
      release = () => gate.resolve();
      break;
  }
  let txn: JobOptions['txn'];
  if (status === 'waiting') {
    txn = registry.createTransaction();
    const pctl = control();
    const partner = registry.createJob({ id: `${id}-partner`, driver: scriptedDriver(pctl), txn });
    partner.start();
    others.push({ job: partner, ctl: pctl });
  }
  const job = registry.createJob({ id, driver: scriptedDriver(ctl), ...(txn && { txn }), ...opts });
  if (status === 'created') return { job, ctl, others, release };
  job.start();
  await settle(job, 'running');
  switch (status) {
    case 'running':
      break;
    case 'paused':
      job.pause();
      await settle(job, 'paused');
      break;
    case 'ready':
    case 'standby':
      ctl.goReady = true;
      job.enter();
      await settle(job, 'ready');
      if (status === 'standby') {
        job.pause();
        await settle(job, 'standby');
      }
      break;
    case 'waiting':
    case 'pending':
    case 'concluded':
    case 'null':
      ctl.finish = true;
      job.enter();
      await settle(job, status);
      break;
    case 'aborting':
      ctl.fail = true;
      ctl.finish = true;
      job.enter();
      await settle(job, 'aborting');
      break;
  }
  return { job, ctl, others, release };
}

/** Ends every job of a staged setup (through verbs), so that no ao is left live. */
export async function drain(staged: Staged): Promise<void> {
  staged.release();
  const all = [staged, ...staged.others];
  for (let i = 0; i < 500; i++) {
    let live = false;
    for (const { job, ctl } of all) {
      ctl.finish = true;
      switch (job.status) {
        case 'null':
          continue;
        case 'created':
        case 'running':
        case 'paused':
        case 'ready':
        case 'standby':
        case 'waiting':
          job.cancel(true);
          break;
        case 'pending':
          job.finalize();
          break;
        case 'concluded':
          job.dismiss();
          break;
        default:
          break;
      }
      live ||= (job.status as JobStatus) !== 'null';
    }
    if (!live) return;
    await turn();
  }
  throw new Error(`jobs never ended: ${all.map((s) => `${s.job.id}=${s.job.status}`).join(', ')}`);
}
