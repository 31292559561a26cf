// The public surface of @vmdisk/ao: what is not exported here is internal.
export {
  Ao,
  type AoBody,
  type AoHandle,
  type AoInitiator,
  type AoOptions,
  type AoOutcome,
  type AoPromise,
  initiateAo,
  runAo,
} from './ao.ts';
export type { AoCallback, AoHow, OperationCompleteEvent } from './ao-how.ts';
export { assertNoLiveAos, type LiveAoInfo, liveAos } from './ao-live.ts';
export type { ProgressReport } from './ao-progress.ts';
export { AoAbortError, AoError, AoErrorCode, JobVerbError } from './errors.ts';
export { EventQueue, type EventWaitOptions } from './event-queue.ts';
export {
  Job,
  type JobDriver,
  type JobInfo,
  type JobOptions,
  JobRegistry,
  JobTxn,
} from './job.ts';
export type { JobEvent, JobStatusChangeEvent } from './job-events.ts';
export {
  JOB_STATUSES,
  JOB_STT,
  JOB_TYPES,
  JOB_VERB_TABLE,
  JOB_VERBS,
  type JobStatus,
  type JobType,
  type JobVerb,
  jobTransitionAllowed,
  jobVerbAllowed,
} from './job-tables.ts';
