// How the caller of an ao is told it completed (libxl_asyncop_how): the types, and the
// check that copies the caller's how-object (the caller may reuse or change it afterwards).

import { AoError, AoErrorCode } from './errors.ts';
import type { AoEventSink } from './event-queue.ts';

/** Completion callback: `err` is null on success. */
export type AoCallback<T> = (err: Error | null, result?: T) => void;

/** The event an ao started with `{ forEvent }` puts on its queue when it completes. */
export interface OperationCompleteEvent<T = unknown> {
  readonly type: 'OPERATION_COMPLETE';
  /** The caller's cookie (`forEvent`), as given (libxl: for_user). */
  readonly forUser: unknown;
  readonly aoId: number;
  readonly kind: string;
  /** null on success. */
  readonly error: Error | null;
  /** The result on success, undefined on failure. */
  readonly result: T | undefined;
}

/**
 * How completion is wanted (libxl_asyncop_how). `undefined`: the initiating function
 * returns a Promise. `{ callback }`: `callback(err, result)` later, and no promise is
 * created. `{ forEvent, queue }`: an OPERATION_COMPLETE event carrying `forEvent` is
 * pushed on `queue` (an EventQueue the caller waits on or polls, or any sink with push).
 */
export type AoHow<T> =
  | { readonly callback: AoCallback<T> }
  | { readonly forEvent: unknown; readonly queue: AoEventSink<OperationCompleteEvent<T>> };

export function copyHow<T>(how: AoHow<T> | undefined): AoHow<T> | undefined {
  if (how === undefined) return undefined;
  if (how === null || typeof how !== 'object') {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'how must be undefined or an object');
  }
  if ('callback' in how) {
    if (typeof how.callback !== 'function') {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'how.callback must be a function');
    }
    if ('forEvent' in how) {
      throw new AoError(
        AoErrorCode.INVALID_ARGUMENT,
        'how takes either callback or forEvent, not both',
      );
    }
    return { callback: how.callback };
  }
  if ('forEvent' in how) {
    const queue = how.queue as unknown;
    if (
      queue === null ||
      typeof queue !== 'object' ||
      typeof (queue as { push?: unknown }).push !== 'function'
    ) {
      throw new AoError(
        AoErrorCode.INVALID_ARGUMENT,
        'how.queue must be an EventQueue (or an object with push)',
      );
    }
    return { forEvent: how.forEvent, queue: how.queue };
  }
  throw new AoError(
    AoErrorCode.INVALID_ARGUMENT,
    'how must be undefined, { callback } or { forEvent, queue }',
  );
}
