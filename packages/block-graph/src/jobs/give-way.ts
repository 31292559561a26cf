// How a block job at full speed gives way to the graph's users (exports, guests, tools).
//
// The daemon's event loop, and on a machine where it is pinned its one CPU, is shared by
// the users' requests and the job's copies; QEMU lets a job take what it can, and a guest
// writing under a mirror keeps a sixth of its IOPS. Here, while users have requests, a job
// works in stretches: one operation at a time, and after each stretch, its own requests
// done, it rests REST_PER_WORK times as long as the stretch took. With no user request
// since its last look the job runs as fast as it can. A `speed` limit applies on top.
//
// The users are all of the graph's: one event loop serves them all, whichever disk they use.

import type { GraphLock } from '../graph-lock.ts';

/**
 * Rest per unit of work while users have requests: the job works a quarter of the time, and
 * in its stretches shares the CPU with them, so that users keep about 7/8 of it. Measured
 * (jobs bench, fio 4 KiB random writes on the export of a mirror's source, write-blocking,
 * qcow2 target, noisy runs): 2 left the export 40-50% of its IOPS, 3 40-70% (most runs
 * 46-54%), 4 48-49%. Beyond 3 the bound is the guest's write itself (source and target).
 */
export const REST_PER_WORK = 3;
/** The longest stretch counted (ms): a job paused or waiting meanwhile did not work. */
const MAX_STRETCH_MS = 100;

export class GiveWay {
  readonly #lock: GraphLock;
  /** The users' admissions at the last look. */
  #seen: number;
  /** When the current stretch of work began. */
  #since = performance.now();

  constructor(lock: GraphLock) {
    this.#lock = lock;
    this.#seen = lock.userAdmissions;
  }

  /** Whether users had requests since the last look: the job keeps one operation in flight. */
  get usersActive(): boolean {
    return this.#lock.userAdmissions !== this.#seen;
  }

  /**
   * At the end of a stretch (the job's requests done): how long (ms) to rest before the next
   * one; 0 when no user had a request meanwhile.
   */
  rest(now = performance.now()): number {
    const admissions = this.#lock.userAdmissions;
    if (admissions === this.#seen) {
      this.#since = now;
      return 0;
    }
    this.#seen = admissions;
    const rest = Math.min(MAX_STRETCH_MS, Math.max(0, now - this.#since)) * REST_PER_WORK;
    this.#since = now + rest;
    return rest;
  }
}
