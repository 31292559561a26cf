// I/O accounting of a node (QEMU's BlockAcctStats, block/accounting.c): per operation
// type, requests done, bytes, failed and invalid requests, total time, requests in flight
// and a latency histogram; the highest offset written. Fixed-size typed arrays: counting
// a request adds no record of its own (only the promise that waits for its end), and
// readers (query-blockstats, the metrics endpoint) read the counters when they are asked,
// never on the I/O path.

import { BlockErrorCode } from './errors.ts';

/** The operation types counted (QEMU's BlockAcctType, with write-zeroes on its own). */
export const ACCT_TYPES = ['read', 'write', 'flush', 'discard', 'zero'] as const;
export type AcctType = (typeof ACCT_TYPES)[number];
export const ACCT_READ = 0;
export const ACCT_WRITE = 1;
export const ACCT_FLUSH = 2;
export const ACCT_DISCARD = 3;
export const ACCT_ZERO = 4;

/** Latency histogram upper bounds, in seconds (a last bucket, +Inf, follows). */
export const LATENCY_BUCKETS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
  0.25, 0.5, 1, 2.5,
];
const BOUNDS_MS = Float64Array.from(LATENCY_BUCKETS, (s) => s * 1000);
const NB = BOUNDS_MS.length + 1;
const NT = ACCT_TYPES.length;

/** The counters of one operation type, as read by a reporter. */
export interface AcctCounters {
  operations: number;
  bytes: number;
  failed: number;
  invalid: number;
  totalTimeNs: number;
  inFlight: number;
  /** Requests per latency bucket (not cumulative): LATENCY_BUCKETS, then +Inf. */
  latency: number[];
}

export class BlockAcctStats {
  private readonly ops = new Float64Array(NT);
  private readonly bytes = new Float64Array(NT);
  private readonly failed = new Float64Array(NT);
  private readonly invalid = new Float64Array(NT);
  private readonly totalMs = new Float64Array(NT);
  private readonly inFlight = new Float64Array(NT);
  private readonly histogram = new Float64Array(NT * NB);
  /** performance.now() of the last request done (0: none yet). */
  private lastAccessMs = 0;
  /** The end of the highest write (QEMU's wr_highest_offset). */
  wrHighestOffset = 0;

  /** A request of `type` starts: returns its start time, to give to done or fail. */
  start(type: number): number {
    this.inFlight[type]!++;
    return performance.now();
  }

  /**
   * Counts request `p` of `type` (started at `t0`, from start): `bytes` when it succeeds,
   * `end` the end of what it wrote (0: not a write).
   */
  track<T>(type: number, t0: number, bytes: number, end: number, p: Promise<T>): Promise<T> {
    return p.then(
      (v) => {
        this.done(type, t0, bytes);
        if (end > this.wrHighestOffset) this.wrHighestOffset = end;
        return v;
      },
      (err: unknown) => {
        this.fail(type, t0, err);
        throw err;
      },
    );
  }

  /** A request of `type` started that did nothing after all (not counted). */
  forget(type: number): void {
    this.inFlight[type]!--;
  }

  /** A request started at `t0` succeeded, with `bytes` transferred. */
  done(type: number, t0: number, bytes: number): void {
    const now = performance.now();
    const ms = now - t0;
    this.inFlight[type]!--;
    this.ops[type]!++;
    this.bytes[type]! += bytes;
    this.totalMs[type]! += ms;
    this.lastAccessMs = now;
    let b = 0;
    while (b < NB - 1 && ms > BOUNDS_MS[b]!) b++;
    this.histogram[type * NB + b]!++;
  }

  /** A request started at `t0` failed: invalid when refused before any I/O (as QEMU's). */
  fail(type: number, t0: number, err: unknown): void {
    const now = performance.now();
    this.inFlight[type]!--;
    this.lastAccessMs = now;
    const code = (err as { code?: unknown } | undefined)?.code;
    if (code === BlockErrorCode.OUT_OF_BOUNDS || code === BlockErrorCode.READ_ONLY) {
      this.invalid[type]!++;
    } else {
      this.failed[type]!++;
      this.totalMs[type]! += now - t0;
    }
  }

  counters(type: AcctType): AcctCounters {
    const t = ACCT_TYPES.indexOf(type);
    return {
      operations: this.ops[t]!,
      bytes: this.bytes[t]!,
      failed: this.failed[t]!,
      invalid: this.invalid[t]!,
      totalTimeNs: Math.round(this.totalMs[t]! * 1e6),
      inFlight: this.inFlight[t]!,
      latency: Array.from(this.histogram.subarray(t * NB, (t + 1) * NB)),
    };
  }

  /** Nanoseconds since the last request was done, or undefined before the first. */
  idleTimeNs(): number | undefined {
    return this.lastAccessMs === 0
      ? undefined
      : Math.round((performance.now() - this.lastAccessMs) * 1e6);
  }
}
