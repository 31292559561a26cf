// A job's progress after QEMU's ProgressMeter (util/progress.c): current and total in an
// arbitrary unit; the total may grow while the job runs.

import { AoError, AoErrorCode } from './errors.ts';

export class ProgressMeter {
  #current = 0;
  #total = 0;
  readonly #onChange: (current: number, total: number) => void;

  /** `onChange` is called after each update, with the new values. */
  constructor(onChange: (current: number, total: number) => void) {
    this.#onChange = onChange;
  }

  get current(): number {
    return this.#current;
  }

  get total(): number {
    return this.#total;
  }

  /** Adds `done` to the current progress (QEMU progress_work_done). */
  workDone(done: number): void {
    checkCount('progress', done);
    this.#current += done;
    this.#onChange(this.#current, this.#total);
  }

  /** Total = current + remaining (QEMU progress_set_remaining). */
  setRemaining(remaining: number): void {
    checkCount('remaining', remaining);
    this.#total = this.#current + remaining;
    this.#onChange(this.#current, this.#total);
  }

  /** Total += delta (QEMU progress_increase_remaining). */
  increaseRemaining(delta: number): void {
    checkCount('delta', delta);
    this.#total += delta;
    this.#onChange(this.#current, this.#total);
  }
}

function checkCount(what: string, n: number): void {
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, `${what} must be a number >= 0, got ${n}`);
  }
}
