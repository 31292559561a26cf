// The rate limit of a block job (QEMU's ratelimit as block_job_ratelimit_sleep uses it):
// the bytes done so far are due at start + bytes / speed; after each chunk the job sleeps
// until its bytes are due. Lagging behind by less than a slice (100 ms: the time of the
// copy itself) is made up; after a longer stall (a pause) the account starts again, so
// that a resumed job does not burst.

const SLICE_MS = 100;

export class RateLimit {
  #speed = 0;
  #start = 0;
  #bytes = 0;
  #due = Number.NEGATIVE_INFINITY;

  /** Bytes per second; 0 = unlimited. A new speed starts a new account. */
  set speed(speed: number) {
    this.#speed = speed;
    this.#due = Number.NEGATIVE_INFINITY;
  }

  get speed(): number {
    return this.#speed;
  }

  /** Accounts `bytes` done now; returns how long (ms) to sleep before the next chunk. */
  account(bytes: number, now = performance.now()): number {
    if (this.#speed === 0) return 0;
    if (now > this.#due + SLICE_MS) {
      this.#start = now;
      this.#bytes = 0;
    }
    this.#bytes += bytes;
    this.#due = this.#start + (this.#bytes * 1000) / this.#speed;
    return Math.max(0, this.#due - now);
  }
}
