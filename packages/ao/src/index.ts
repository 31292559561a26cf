// The public surface of @vmdisk/ao: what is not exported here is internal.
export {
  Ao,
  type AoBody,
  type AoCallback,
  type AoHandle,
  type AoHow,
  type AoInitiator,
  type AoOptions,
  type AoOutcome,
  type AoPromise,
  assertNoLiveAos,
  initiateAo,
  type LiveAoInfo,
  liveAos,
  type OperationCompleteEvent,
  type ProgressReport,
  runAo,
} from './ao.ts';
export { AoAbortError, AoError, AoErrorCode, JobVerbError } from './errors.ts';
export { EventQueue, type EventWaitOptions } from './event-queue.ts';
export {
  Job,
  type JobDriver,
  type JobEvent,
  type JobInfo,
  type JobOptions,
  JobRegistry,
  type JobStatusChangeEvent,
  JobTxn,
} from './job.ts';
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
