// The errors of @vmdisk/ao: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

/** Every stable code this package uses. */
export const AoErrorCode = {
  /** A how-object, kind, option or argument is malformed. */
  INVALID_ARGUMENT: 'ERR_VMDISK_AO_INVALID_ARGUMENT',
  /** `complete()` was called on an ao that has already completed (libxl: exactly once). */
  ALREADY_COMPLETE: 'ERR_VMDISK_AO_ALREADY_COMPLETE',
  /** An ao was aborted and chose to complete with the abort (the reason is kept). */
  ABORTED: 'ERR_VMDISK_AO_ABORTED',
  /** A parent ao tried to complete while some of its nested aos were still live. */
  CHILDREN_LIVE: 'ERR_VMDISK_AO_CHILDREN_LIVE',
  /** A nested ao was started on a parent that has already completed. */
  PARENT_COMPLETE: 'ERR_VMDISK_AO_PARENT_COMPLETE',
  /** An operation failed with something that is not an Error (kept as the cause). */
  NON_ERROR_FAILURE: 'ERR_VMDISK_AO_NON_ERROR_FAILURE',
  /** `assertNoLiveAos()` found aos that were never completed. */
  LEAKED: 'ERR_VMDISK_AO_LEAKED',
  /** A job verb was applied in a state whose JobVerbTable entry forbids it. */
  JOB_VERB_REFUSED: 'ERR_VMDISK_AO_JOB_VERB_REFUSED',
  /** A job ID is not well formed (QEMU id_wellformed). */
  JOB_ID_INVALID: 'ERR_VMDISK_AO_JOB_ID_INVALID',
  /** A job ID is already used by a job of the same registry. */
  JOB_ID_IN_USE: 'ERR_VMDISK_AO_JOB_ID_IN_USE',
  /** No job with that ID. */
  JOB_NOT_FOUND: 'ERR_VMDISK_AO_JOB_NOT_FOUND',
  /** `pause` on a job the user already paused. */
  JOB_ALREADY_PAUSED: 'ERR_VMDISK_AO_JOB_ALREADY_PAUSED',
  /** `resume` on a job the user did not pause. */
  JOB_NOT_PAUSED: 'ERR_VMDISK_AO_JOB_NOT_PAUSED',
  /** `complete` on a job that has no completion handler or whose cancel was requested. */
  JOB_CANNOT_COMPLETE: 'ERR_VMDISK_AO_JOB_CANNOT_COMPLETE',
  /** `change` on a job whose driver does not support it. */
  JOB_CHANGE_UNSUPPORTED: 'ERR_VMDISK_AO_JOB_CHANGE_UNSUPPORTED',
  /** The error a job ends with when it was cancelled (QEMU: -ECANCELED). */
  JOB_CANCELLED: 'ERR_VMDISK_AO_JOB_CANCELLED',
  /** `start()` on a job that has already been started or has ended. */
  JOB_ALREADY_STARTED: 'ERR_VMDISK_AO_JOB_ALREADY_STARTED',
  /** A job body used a job-internal call in a state that does not allow it. */
  JOB_STATE: 'ERR_VMDISK_AO_JOB_STATE',
  /** A transaction was given jobs of another registry, or a job joined twice. */
  JOB_TXN: 'ERR_VMDISK_AO_JOB_TXN',
  /** `EventQueue.wait()` was aborted through its signal. */
  WAIT_ABORTED: 'ERR_VMDISK_AO_WAIT_ABORTED',
} as const;

export type AoErrorCode = (typeof AoErrorCode)[keyof typeof AoErrorCode];

export class AoError extends Error {
  override name = 'AoError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_AO_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/**
 * What an aborted ao completes with when it honours the abort. `name` is 'AbortError'
 * (as for DOM aborts) and `reason` is the reason given to `abort()` or carried by the
 * caller's AbortSignal (also the `cause`).
 */
export class AoAbortError extends AoError {
  override name = 'AbortError';
  readonly reason: unknown;

  constructor(reason: unknown, message = 'The operation was aborted') {
    super(AoErrorCode.ABORTED, message, { cause: reason });
    this.reason = reason;
  }
}

/**
 * A job verb refused by QEMU's JobVerbTable; the message follows QEMU's
 * "Job '%s' in state '%s' cannot accept command verb '%s'".
 */
export class JobVerbError extends AoError {
  override name = 'JobVerbError';
  readonly jobId: string;
  readonly status: string;
  readonly verb: string;

  constructor(jobId: string, status: string, verb: string) {
    super(
      AoErrorCode.JOB_VERB_REFUSED,
      `Job '${jobId}' in state '${status}' cannot accept command verb '${verb}'`,
    );
    this.jobId = jobId;
    this.status = status;
    this.verb = verb;
  }
}
