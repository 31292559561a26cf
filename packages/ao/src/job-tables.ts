// QEMU's job model: the JobStatus and JobVerb enums of qapi/job.json and the two tables
// of job.c, JobSTT (state transitions) and JobVerbTable, reproduced entry for entry from
// QEMU's current sources (JobVerbTable with 'complete' allowed in standby and the
// 'change' verb of QEMU 8.2). Row and column orders are QEMU's.

/** qapi/job.json JobStatus, in enum order (U, C, R, P, Y, S, W, D, X, E, N). */
export const JOB_STATUSES = [
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
] as const;

export type JobStatus = (typeof JOB_STATUSES)[number];

/** qapi/job.json JobVerb, in enum order. */
export const JOB_VERBS = [
  'cancel',
  'pause',
  'resume',
  'set-speed',
  'complete',
  'dismiss',
  'finalize',
  'change',
] as const;

export type JobVerb = (typeof JOB_VERBS)[number];

/** qapi/job.json JobType (the kinds of job QEMU knows). */
export const JOB_TYPES = [
  'commit',
  'stream',
  'mirror',
  'backup',
  'create',
  'amend',
  'snapshot-load',
  'snapshot-save',
  'snapshot-delete',
] as const;

export type JobType = (typeof JOB_TYPES)[number];

type Row = readonly [0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1, 0 | 1];

/** job.c JobSTT[from][to]: 1 where the transition from -> to is allowed. */
// biome-ignore format: the table keeps QEMU's layout
export const JOB_STT: Readonly<Record<JobStatus, Row>> = Object.freeze({
  //              U  C  R  P  Y  S  W  D  X  E  N
  undefined: [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  created:   [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
  running:   [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
  paused:    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
  ready:     [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
  standby:   [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
  waiting:   [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
  pending:   [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
  aborting:  [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
  concluded: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
  null:      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
} as const);

/** job.c JobVerbTable[verb][status]: 1 where the verb is accepted in that status. */
// biome-ignore format: the table keeps QEMU's layout
export const JOB_VERB_TABLE: Readonly<Record<JobVerb, Row>> = Object.freeze({
  //                U  C  R  P  Y  S  W  D  X  E  N
  cancel:          [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
  pause:           [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  resume:          [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  'set-speed':     [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  complete:        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
  finalize:        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
  dismiss:         [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
  change:          [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
} as const);

/** Whether JobSTT allows the transition `from` -> `to`. */
export function jobTransitionAllowed(from: JobStatus, to: JobStatus): boolean {
  return JOB_STT[from][JOB_STATUSES.indexOf(to)] === 1;
}

/** Whether JobVerbTable accepts `verb` in `status`. */
export function jobVerbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return JOB_VERB_TABLE[verb][JOB_STATUSES.indexOf(status)] === 1;
}
