// QEMU's tables, reproduced and enforced: JobSTT for every pair of statuses, and
// JobVerbTable for every status x verb, both as data and on real jobs.
import { describe, expect, it } from 'vitest';
import {
  JOB_STATUSES,
  JOB_STT,
  JOB_VERB_TABLE,
  JOB_VERBS,
  type Job,
  type JobStatus,
  type JobVerb,
  JobVerbError,
  jobTransitionAllowed,
  jobVerbAllowed,
} from '../src/index.ts';
import { turns } from './helpers.ts';
import { drain, historyOf, recordingRegistry, stage } from './job-harness.ts';

// Written independently of src/job-tables.ts, from QEMU's job.c (current master):
// every allowed transition, as "from -> to" pairs.
const ALLOWED_TRANSITIONS = new Set([
  'undefined->created',
  'created->running',
  'created->aborting',
  'created->null',
  'running->paused',
  'running->ready',
  'running->waiting',
  'running->aborting',
  'paused->running',
  'ready->standby',
  'ready->waiting',
  'ready->aborting',
  'standby->ready',
  'waiting->pending',
  'waiting->aborting',
  'pending->aborting',
  'pending->concluded',
  'aborting->aborting',
  'aborting->concluded',
  'concluded->null',
]);

// Every status in which each verb is accepted (job.c JobVerbTable).
const ALLOWED_VERBS: Record<JobVerb, JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  dismiss: ['concluded'],
  finalize: ['pending'],
  change: ['created', 'running', 'paused', 'ready', 'standby'],
};

describe('the enums', () => {
  it('are qapi/job.json JobStatus and JobVerb, in enum order', () => {
    expect(JOB_STATUSES).toEqual([
      'undefined',
      'created',
      'running',
      'paused',
      'ready',
      'standby',
      'waiting',
      'pending',
      'aborting',
      'concluded',
      'null',
    ]);
    expect(JOB_VERBS).toEqual([
      'cancel',
      'pause',
      'resume',
      'set-speed',
      'complete',
      'dismiss',
      'finalize',
      'change',
    ]);
  });
});

describe('JobSTT', () => {
  const pairs = JOB_STATUSES.flatMap((from) => JOB_STATUSES.map((to) => [from, to] as const));

  it.each(pairs)('%s -> %s matches job.c', (from, to) => {
    const expected = ALLOWED_TRANSITIONS.has(`${from}->${to}`);
    expect(jobTransitionAllowed(from, to)).toBe(expected);
    expect(JOB_STT[from][JOB_STATUSES.indexOf(to)]).toBe(expected ? 1 : 0);
  });

  it('has 11 rows of 11 and is frozen', () => {
    expect(Object.keys(JOB_STT)).toEqual([...JOB_STATUSES]);
    for (const row of Object.values(JOB_STT)) expect(row).toHaveLength(11);
    expect(Object.isFrozen(JOB_STT)).toBe(true);
  });
});

describe('JobVerbTable', () => {
  const cells = JOB_STATUSES.flatMap((status) => JOB_VERBS.map((verb) => [status, verb] as const));

  it.each(cells)('in %s, %s matches job.c', (status, verb) => {
    const expected = ALLOWED_VERBS[verb].includes(status);
    expect(jobVerbAllowed(verb, status)).toBe(expected);
    expect(JOB_VERB_TABLE[verb][JOB_STATUSES.indexOf(status)]).toBe(expected ? 1 : 0);
  });
});

const APPLY: Record<JobVerb, (job: Job) => void> = {
  cancel: (job) => job.cancel(),
  pause: (job) => job.pause(),
  resume: (job) => job.resume(),
  'set-speed': (job) => job.setSpeed(1 << 20),
  complete: (job) => job.complete(),
  dismiss: (job) => job.dismiss(),
  finalize: (job) => job.finalize(),
  change: (job) => job.change({ 'new-speed': 1 }),
};

describe('every status x every verb on a real job', () => {
  // 'undefined' is the status before creation: no Job object is ever in it.
  const reachable = JOB_STATUSES.filter((s) => s !== 'undefined') as Exclude<
    JobStatus,
    'undefined'
  >[];
  const cells = reachable.flatMap((status) => JOB_VERBS.map((verb) => [status, verb] as const));
  let n = 0;

  it.each(cells)('in %s, %s', async (status, verb) => {
    const { registry, events } = recordingRegistry();
    const id = `job${n++}`;
    const staged = await stage(registry, status, id);
    const { job } = staged;
    expect(job.status).toBe(status);
    const userPausedBefore = job.userPaused;
    let thrown: unknown;
    try {
      APPLY[verb](job);
    } catch (e) {
      thrown = e;
    }
    if (!ALLOWED_VERBS[verb].includes(status)) {
      expect(thrown).toBeInstanceOf(JobVerbError);
      expect(thrown).toMatchObject({
        code: 'ERR_VMDISK_AO_JOB_VERB_REFUSED',
        jobId: id,
        status,
        verb,
        message: `Job '${id}' in state '${status}' cannot accept command verb '${verb}'`,
      });
      expect(job.status).toBe(status);
    } else if (verb === 'resume' && !userPausedBefore) {
      expect(thrown).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_NOT_PAUSED' });
    } else if (verb === 'pause' && userPausedBefore) {
      expect(thrown).toMatchObject({ code: 'ERR_VMDISK_AO_JOB_ALREADY_PAUSED' });
    } else {
      expect(thrown).toBeUndefined();
    }
    await drain(staged);
    await turns(2);
    // Whatever happened, every status change the jobs went through is allowed by JobSTT.
    for (const j of [job, ...staged.others.map((o) => o.job)]) {
      const history: JobStatus[] = ['undefined', ...historyOf(events, j.id)];
      for (let i = 1; i < history.length; i++) {
        expect(
          ALLOWED_TRANSITIONS.has(`${history[i - 1]}->${history[i]}`),
          history.join(' -> '),
        ).toBe(true);
      }
      expect(history.at(-1)).toBe('null');
    }
  });
});
