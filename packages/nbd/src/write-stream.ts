// The payload of a WRITE larger than STREAM_PIECE, taken from the socket in pieces: each
// piece fills from the socket, is written to the target, and its buffer freed once
// written. The request was admitted for one piece of the memory budget, which covers a
// piece out at any time; a second one (PIPELINE) is out only when the budget has room to
// spare. So a client that sends a large payload slowly (or never finishes it) pins at
// most two pieces. A piece that fails stops the writing: the rest of the payload is read
// and dropped, and the request is answered with the failure.

import type { ByteQueue } from './byte-queue.ts';
import type { ExportTarget } from './export-target.ts';
import type { BudgetAccount } from './memory-budget.ts';
import { STREAM_PIECE } from './memory-budget.ts';

const PIPELINE = 2;
const NO_FUA = Object.freeze({ fua: false });

export interface WriteStreamHost {
  readonly target: ExportTarget;
  /** The connection's account: the request holds one piece of it already. */
  readonly account: BudgetAccount;
  alloc(length: number): Uint8Array;
  free(buf: Uint8Array): void;
  /** A piece was written: the connection may take more of the payload. */
  resume(): void;
}

/** How a streamed write ended: written, stopped by the connection closing, or failed. */
export type WriteOutcome = 'written' | 'aborted' | { error: unknown };

export class WriteStream {
  private readonly host: WriteStreamHost;
  private readonly offset: number;
  private readonly length: number;
  /** Bytes of the payload taken from the socket so far. */
  private taken = 0;
  /** The piece being filled. */
  private buf: Uint8Array | undefined;
  private filled = 0;
  /** Pieces out: filling or being written. */
  private out = 0;
  /** A piece out is covered by the request's own piece of the budget. */
  private ownUsed = false;
  /** Pieces out whose bytes were taken beyond the request's piece. */
  private readonly extras = new WeakSet<Uint8Array>();
  private failure: unknown;
  private aborted = false;
  private finished = false;
  private readonly onDone: (outcome: WriteOutcome) => void;

  /** Pieces are written without FUA: a FUA request flushes once they are all written. */
  constructor(
    host: WriteStreamHost,
    offset: number,
    length: number,
    onDone: (outcome: WriteOutcome) => void,
  ) {
    this.host = host;
    this.offset = offset;
    this.length = length;
    this.onDone = onDone;
  }

  /**
   * Takes what it can of the payload from `q`. True once all of it is taken (the stream
   * may still be writing); false when it wants more bytes (`waiting` false: read the
   * socket) or has to wait for a piece to be written or for budget (`waiting` true).
   */
  consume(q: ByteQueue): boolean {
    this.waiting = false;
    while (this.taken < this.length) {
      if (this.failure !== undefined) {
        // Dropped, not buffered: the stream stays in sync.
        const partial = this.buf;
        this.buf = undefined;
        if (partial !== undefined) this.release(partial);
        this.taken += q.skip(this.length - this.taken);
        if (this.taken < this.length) return false;
        break;
      }
      if (this.buf === undefined) {
        const n = Math.min(STREAM_PIECE, this.length - this.taken);
        // The request's own piece covers one out; a second needs room to spare.
        const extra = this.ownUsed;
        if (extra && (this.out >= PIPELINE || !this.host.account.tryTake(n))) {
          this.waiting = true;
          return false;
        }
        let buf: Uint8Array;
        try {
          buf = this.host.alloc(n);
        } catch (err) {
          this.failure = err;
          if (extra) this.host.account.give(n);
          continue;
        }
        this.out++;
        if (extra) this.extras.add(buf);
        else this.ownUsed = true;
        this.buf = buf;
        this.filled = 0;
      }
      const buf = this.buf;
      const n = Math.min(q.length, buf.length - this.filled);
      if (n > 0) q.copyInto(buf, this.filled, n);
      this.filled += n;
      this.taken += n;
      if (this.filled < buf.length) return false;
      this.buf = undefined;
      this.writePiece(this.offset + this.taken - buf.length, buf);
    }
    this.maybeFinish();
    return true;
  }

  /** Set by consume: it cannot go on until a piece is written or budget comes back. */
  waiting = false;

  /** The connection closed: nothing more comes; finish once the pieces out are back. */
  abort(): void {
    this.aborted = true;
    const buf = this.buf;
    if (buf !== undefined) {
      this.buf = undefined;
      this.release(buf);
    }
    this.taken = this.length;
    this.maybeFinish();
  }

  private writePiece(at: number, buf: Uint8Array): void {
    const t = this.host.target;
    let op: Promise<void>;
    try {
      op = Promise.resolve(t.write!(at, buf, NO_FUA));
    } catch (err) {
      op = Promise.reject(err);
    }
    op.then(
      () => this.written(buf),
      (err: unknown) => {
        this.failure ??= err;
        this.written(buf);
      },
    );
  }

  private written(buf: Uint8Array): void {
    this.release(buf);
    if (this.taken < this.length) this.host.resume();
    this.maybeFinish();
  }

  private release(buf: Uint8Array): void {
    this.out--;
    if (this.extras.delete(buf)) this.host.account.give(buf.length);
    else this.ownUsed = false;
    this.host.free(buf);
  }

  private maybeFinish(): void {
    if (this.finished || this.out > 0 || this.taken < this.length) return;
    this.finished = true;
    if (this.aborted) this.onDone('aborted');
    else if (this.failure !== undefined) this.onDone({ error: this.failure });
    else this.onDone('written');
  }
}
