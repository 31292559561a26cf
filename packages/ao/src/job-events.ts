// The JOB_STATUS_CHANGE events of one job registry: every status change goes to the
// listeners and to the registry's event queue, later (never on the changer's stack) and
// in order.

import { defer } from './defer.ts';
import { AoError, AoErrorCode } from './errors.ts';
import type { AoEventSink } from './event-queue.ts';
import type { JobStatus } from './job-tables.ts';

/** The QMP event a status change is forwarded as (the app adds the timestamp). */
export interface JobStatusChangeEvent {
  readonly event: 'JOB_STATUS_CHANGE';
  readonly data: { readonly id: string; readonly status: JobStatus };
}

/** Another event of a job (a block job's BLOCK_JOB_COMPLETED, ...), delivered with the
 * JOB_STATUS_CHANGE events, in order with them (JobRegistry.emitEvent). */
export interface JobEvent {
  readonly event: string;
  readonly data: Readonly<Record<string, unknown>>;
}

export class JobStatusEvents {
  readonly #listeners = new Set<(event: JobStatusChangeEvent) => void>();
  readonly #queue: AoEventSink<JobStatusChangeEvent | JobEvent> | undefined;

  /** `events`: an EventQueue (or any sink with push) that receives every event. */
  constructor(events: AoEventSink<JobStatusChangeEvent | JobEvent> | undefined) {
    if (events !== undefined && (events === null || typeof events.push !== 'function')) {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'events must have a push method');
    }
    this.#queue = events;
  }

  /** Calls `listener` (later, in order) for every event; returns an unsubscribe. */
  listen(listener: (event: JobStatusChangeEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  emit(id: string, status: JobStatus): void {
    const event: JobStatusChangeEvent = { event: 'JOB_STATUS_CHANGE', data: { id, status } };
    if (this.#listeners.size === 0 && !this.#queue) return;
    for (const l of [...this.#listeners]) defer(() => l(event));
    const queue = this.#queue;
    if (queue) defer(() => queue.push(event));
  }

  /** Queues another event to the sink, after every event queued before. */
  other(event: JobEvent): void {
    const queue = this.#queue;
    if (queue) defer(() => queue.push(event));
  }
}
