// An event queue the application waits on or polls, after libxl's libxl_event_wait and
// libxl_event_check: OPERATION_COMPLETE events of aos started with `{ forEvent }` and,
// if a JobRegistry is given one, JOB_STATUS_CHANGE events.

import { AoError, AoErrorCode } from './errors.ts';

/**
 * Where events are put: an EventQueue, or any object with `push` (e.g. one that forwards
 * each event to a QMP monitor at once).
 */
export interface AoEventSink<E> {
  push(event: E): void;
}

interface Waiter<E> {
  resolve(event: E): void;
  reject(err: Error): void;
  cleanup(): void;
}

export interface EventWaitOptions {
  /** Stops the wait: the promise rejects with ERR_VMDISK_AO_WAIT_ABORTED (reason as cause). */
  signal?: AbortSignal;
}

/**
 * A FIFO of events. Events pushed while nobody waits are kept until `check()` or
 * `wait()` takes them; a waiter takes the oldest event. Unbounded by design: every event
 * is the result of an operation the application started or a job it runs.
 */
export class EventQueue<E = unknown> implements AoEventSink<E> {
  readonly #events: E[] = [];
  readonly #waiters: Waiter<E>[] = [];

  /** How many events are queued and not yet taken. */
  get size(): number {
    return this.#events.length;
  }

  /** Adds an event: the oldest waiter, if any, gets it (asynchronously, as promises do). */
  push(event: E): void {
    const waiter = this.#waiters.shift();
    if (waiter) {
      waiter.cleanup();
      waiter.resolve(event);
    } else {
      this.#events.push(event);
    }
  }

  /** Takes the oldest event if there is one, without waiting (libxl_event_check). */
  check(): E | undefined {
    return this.#events.shift();
  }

  /** Takes the oldest event, waiting for one if none is queued (libxl_event_wait). */
  wait(options: EventWaitOptions = {}): Promise<E> {
    const { signal } = options;
    if (this.#events.length > 0) return Promise.resolve(this.#events.shift() as E);
    if (signal?.aborted) return Promise.reject(waitAborted(signal.reason));
    return new Promise<E>((resolve, reject) => {
      const onAbort = (): void => {
        const i = this.#waiters.indexOf(waiter);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(waitAborted(signal?.reason));
      };
      const waiter: Waiter<E> = {
        resolve,
        reject,
        cleanup: () => signal?.removeEventListener('abort', onAbort),
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiters.push(waiter);
    });
  }
}

function waitAborted(reason: unknown): AoError {
  return new AoError(AoErrorCode.WAIT_ABORTED, 'Waiting for an event was aborted', {
    cause: reason,
  });
}
