// A READ larger than STREAM_PIECE, served in pieces: each piece is read from the target,
// handed to the socket in order, and its buffer freed once the kernel has it. The
// connection holds one piece of the memory budget for the stream running (its stream
// slot), which covers a piece out at any time; a second one (PIPELINE) is out only when
// the budget has room to spare. So a client that does not read its replies pins at most
// two pieces, whatever it asked for, and the stream never waits on the budget (replies
// behind it wait on it).
//
// On the wire: with simple replies, or a DF read, one reply header then all the data (a
// piece that fails after the header went out can only be answered by disconnecting, as
// the spec says); with structured replies, one OFFSET_DATA chunk per piece and
// OFFSET_HOLE chunks for the holes the target reports cheaply, the last chunk DONE, and a
// failure is an ERROR chunk. The stream holds the send queue from its first byte to its
// last, so that nothing comes between.

import type { ExportTarget } from './export-target.ts';
import type { BudgetAccount } from './memory-budget.ts';
import { STREAM_PIECE } from './memory-budget.ts';
import type { SendQueue } from './send-queue.ts';

/** Pieces out at once (read from the target or waiting for the kernel). */
const PIPELINE = 2;

/** A range of the READ: data to read, or zeros to send as a hole. */
export interface Segment {
  offset: number;
  length: number;
  zero: boolean;
}

/** What a stream needs from its connection. */
export interface StreamHost {
  readonly target: ExportTarget;
  /** The connection's account: it holds one piece for the stream already (its slot). */
  readonly account: BudgetAccount;
  readonly sendQueue: SendQueue;
  /** The connection is closed: no more pieces are read. */
  isClosed(): boolean;
  alloc(length: number): Uint8Array;
  free(buf: Uint8Array): void;
  /**
   * The header of what goes first (`single`: the one simple reply header or OFFSET_DATA
   * chunk header for the whole read), or of one chunk: OFFSET_DATA of `length` bytes at
   * `offset`, OFFSET_HOLE, or the ERROR chunk for `errno` and `message` (always DONE).
   */
  header(
    what:
      | { single: true }
      | { data: true; offset: number; length: number; done: boolean }
      | { hole: true; offset: number; length: number; done: boolean }
      | { errno: number; message: string },
  ): Buffer;
  /** A piece failed after data went out with a single header: the client must go. */
  fatal(err: unknown): void;
  /** The errno and message a failure is answered with. */
  describe(err: unknown): [number, string];
}

/**
 * How a stream ended: the whole read sent; stopped by the connection closing; or failed,
 * `answered` when the client was told (an ERROR chunk, or the disconnect) and otherwise
 * to be answered as any failed request (nothing of the reply went out).
 */
export type StreamOutcome = 'sent' | 'aborted' | { error: unknown; answered: boolean };

interface Piece {
  offset: number;
  length: number;
  zero: boolean;
  buf?: Uint8Array | undefined;
  /** Read (or a hole): may go out. */
  ready: boolean;
  failure?: unknown;
  /** Out (a data piece, until the kernel has it). */
  out: boolean;
  /** Its bytes were taken from the budget beyond the stream slot's piece. */
  extra: boolean;
}

export class ReadStream {
  private readonly host: StreamHost;
  private readonly single: boolean;
  /** Segments not yet cut into pieces, and how far into the first one. */
  private readonly todo: Segment[];
  private cut = 0;
  /** Pieces cut, in wire order, not yet handed to the socket. */
  private readonly pieces: Piece[] = [];
  /** Data pieces out (being read or in the socket). */
  private out = 0;
  /** A piece out is covered by the stream slot. */
  private slotUsed = false;
  private started = false;
  private headerSent = false;
  private ended = false;
  private failure: unknown;
  private finished = false;
  private readonly onDone: (outcome: StreamOutcome) => void;

  /**
   * `single`: one header for the whole read (simple replies, or DF). `onDone` runs once,
   * when nothing of the stream is left in flight.
   */
  constructor(
    host: StreamHost,
    segments: Segment[],
    single: boolean,
    onDone: (outcome: StreamOutcome) => void,
  ) {
    this.host = host;
    this.single = single;
    this.todo = segments;
    this.onDone = onDone;
  }

  start(): void {
    this.host.sendQueue.hold();
    this.started = true;
    this.fill();
  }

  /** The connection closed: read no more, finish once what is out has come back. */
  abort(): void {
    this.ended = true;
    if (!this.started) {
      this.finish('aborted');
      return;
    }
    this.maybeFinish();
  }

  private fill(): void {
    const host = this.host;
    if (host.isClosed()) this.ended = true;
    while (!this.ended && this.todo.length > 0) {
      const seg = this.todo[0]!;
      const offset = seg.offset + this.cut;
      const length = seg.zero
        ? seg.length - this.cut
        : Math.min(STREAM_PIECE, seg.length - this.cut);
      // The stream slot covers one piece out; a second needs room to spare.
      let extra = false;
      if (!seg.zero) {
        if (!this.slotUsed) this.slotUsed = true;
        else if (this.out < PIPELINE && host.account.tryTake(length)) extra = true;
        else break;
      }
      this.cut += length;
      if (this.cut === seg.length) {
        this.todo.shift();
        this.cut = 0;
      }
      const piece: Piece = {
        offset,
        length,
        zero: seg.zero,
        ready: seg.zero,
        out: !seg.zero,
        extra,
      };
      this.pieces.push(piece);
      if (!seg.zero) {
        this.out++;
        this.readPiece(piece);
      }
    }
    this.send();
    this.maybeFinish();
  }

  private readPiece(piece: Piece): void {
    const host = this.host;
    let buf: Uint8Array;
    try {
      buf = host.alloc(piece.length);
    } catch (err) {
      piece.failure = err;
      piece.ready = true;
      return;
    }
    piece.buf = buf;
    let op: Promise<void>;
    try {
      op = Promise.resolve(host.target.read(piece.offset, buf));
    } catch (err) {
      op = Promise.reject(err);
    }
    op.then(
      () => {
        piece.ready = true;
        this.send();
        this.maybeFinish();
      },
      (err: unknown) => {
        piece.failure = err;
        piece.ready = true;
        this.send();
        this.maybeFinish();
      },
    );
  }

  /** Hands the pieces that are ready, in order, to the socket. */
  private send(): void {
    const host = this.host;
    while (this.pieces.length > 0 && this.pieces[0]!.ready) {
      const piece = this.pieces.shift()!;
      if (piece.failure !== undefined || this.failure !== undefined) {
        this.failed(piece);
        continue;
      }
      const last = this.todo.length === 0 && this.pieces.length === 0;
      const bufs: Uint8Array[] = [];
      if (this.single) {
        if (!this.headerSent) bufs.push(host.header({ single: true }));
      } else if (piece.zero) {
        bufs.push(
          host.header({ hole: true, offset: piece.offset, length: piece.length, done: last }),
        );
      } else {
        bufs.push(
          host.header({ data: true, offset: piece.offset, length: piece.length, done: last }),
        );
      }
      this.headerSent = true;
      if (piece.buf !== undefined) bufs.push(piece.buf);
      host.sendQueue.sendHeld(bufs, () => this.sent(piece));
    }
  }

  /** A piece that failed, or one after a failure: dropped; the failure answered once. */
  private failed(piece: Piece): void {
    const host = this.host;
    if (this.failure === undefined) {
      this.failure = piece.failure;
      this.ended = true;
      if (!this.headerSent) {
        // Nothing went out: the read fails as any request does, once the rest is back.
      } else if (this.single) {
        host.fatal(this.failure);
      } else {
        const [errno, message] = host.describe(this.failure);
        host.sendQueue.sendHeld([host.header({ errno, message })]);
      }
    }
    this.release(piece);
  }

  private sent(piece: Piece): void {
    this.release(piece);
    this.fill();
  }

  private release(piece: Piece): void {
    if (piece.buf !== undefined) this.host.free(piece.buf);
    piece.buf = undefined;
    if (piece.out) {
      piece.out = false;
      this.out--;
      if (piece.extra) this.host.account.give(piece.length);
      else this.slotUsed = false;
    }
  }

  private maybeFinish(): void {
    if (this.finished || this.out > 0) return;
    if (!this.ended && (this.todo.length > 0 || this.pieces.length > 0)) return;
    // Pieces cut and never read (the stream ended first) hold nothing.
    for (const p of this.pieces.splice(0)) this.release(p);
    const failure = this.failure;
    if (failure !== undefined) this.finish({ error: failure, answered: this.headerSent });
    else this.finish(this.ended ? 'aborted' : 'sent');
  }

  private finish(outcome: StreamOutcome): void {
    if (this.finished) return;
    this.finished = true;
    if (this.started) this.host.sendQueue.release();
    this.onDone(outcome);
  }
}
