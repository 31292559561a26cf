// The progress of one ao: the latest report, the caller's callback (coalesced: a slow
// consumer gets the latest) and async iterators that end when the ao completes.

import { defer } from './defer.ts';
import { AoError, AoErrorCode } from './errors.ts';

/** A progress report: `done` out of `total` units (arbitrary unit), and an optional note. */
export interface ProgressReport {
  readonly done: number;
  readonly total: number;
  readonly message?: string;
}

interface ProgressWaiter {
  resolve(r: IteratorResult<ProgressReport, undefined>): void;
}

/** @internal: the progress part of an Ao. */
export class AoProgress {
  readonly #onProgress: ((report: ProgressReport) => void) | undefined;
  #completed = false;
  #progress: ProgressReport | undefined;
  #progressSeq = 0;
  #progressDeliveryQueued = false;
  readonly #progressWaiters = new Set<ProgressWaiter & { seen: { seq: number } }>();

  constructor(onProgress: ((report: ProgressReport) => void) | undefined) {
    this.#onProgress = onProgress;
  }

  get last(): ProgressReport | undefined {
    return this.#progress;
  }

  /** Records a report; the callback and iterators see the latest. */
  report(done: number, total: number, message?: string): void {
    if (!Number.isFinite(done) || !Number.isFinite(total) || done < 0 || total < 0) {
      throw new AoError(
        AoErrorCode.INVALID_ARGUMENT,
        `progress must be finite and non-negative (done ${done}, total ${total})`,
      );
    }
    if (message !== undefined && typeof message !== 'string') {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'progress message must be a string');
    }
    this.#progress = message === undefined ? { done, total } : { done, total, message };
    this.#progressSeq++;
    // A job reports per copy: no array where no iterator waits.
    if (this.#progressWaiters.size > 0) {
      for (const w of [...this.#progressWaiters]) {
        this.#progressWaiters.delete(w);
        w.seen.seq = this.#progressSeq;
        w.resolve({ value: this.#progress, done: false });
      }
    }
    const onProgress = this.#onProgress;
    if (onProgress && !this.#progressDeliveryQueued) {
      this.#progressDeliveryQueued = true;
      defer(() => {
        this.#progressDeliveryQueued = false;
        if (this.#progress) onProgress(this.#progress);
      });
    }
  }

  iterator(): AsyncIterableIterator<ProgressReport> {
    const seen = { seq: 0 };
    let finished = false;
    let pending: (ProgressWaiter & { seen: { seq: number } }) | undefined;
    const iterator: AsyncIterableIterator<ProgressReport> = {
      next: () => {
        if (finished) return Promise.resolve({ value: undefined, done: true });
        if (this.#progressSeq > seen.seq && this.#progress) {
          seen.seq = this.#progressSeq;
          return Promise.resolve({ value: this.#progress, done: false });
        }
        if (this.#completed) {
          finished = true;
          return Promise.resolve({ value: undefined, done: true });
        }
        return new Promise<IteratorResult<ProgressReport, undefined>>((resolve) => {
          pending = {
            seen,
            resolve: (r) => {
              pending = undefined;
              if (r.done) finished = true;
              resolve(r);
            },
          };
          this.#progressWaiters.add(pending);
        });
      },
      return: () => {
        finished = true;
        if (pending) {
          this.#progressWaiters.delete(pending);
          pending.resolve({ value: undefined, done: true });
        }
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return iterator;
      },
    };
    return iterator;
  }

  /** The ao completed: each iterator gets the report it has not seen, then ends. */
  end(): void {
    this.#completed = true;
    for (const w of [...this.#progressWaiters]) {
      this.#progressWaiters.delete(w);
      if (this.#progressSeq > w.seen.seq && this.#progress) {
        w.seen.seq = this.#progressSeq;
        w.resolve({ value: this.#progress, done: false });
      } else {
        w.resolve({ value: undefined, done: true });
      }
    }
  }
}
