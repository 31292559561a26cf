// The transmission phase of one connection: the receive loop parses requests and starts
// each on its own (up to maxInFlight, and while the memory budget admits its data;
// otherwise the socket is no longer read); replies leave through the connection's one
// send queue. WRITEs larger than STREAM_PIECE take their payload in pieces
// (write-stream.ts); READs are server-reads.ts's.

import type { BufferPool } from './buffer-pool.ts';
import type { ByteQueue } from './byte-queue.ts';
import { NbdError } from './errors.ts';
import type { ExportEntry } from './export-entry.ts';
import { type BudgetAccount, STREAM_PIECE } from './memory-budget.ts';
import {
  Command,
  CommandFlag,
  EXTENDED_REQUEST_MAGIC,
  MAX_PAYLOAD_BYTES,
  REQUEST_MAGIC,
  STATE_DIRTY,
  WireError,
} from './protocol.ts';
import type { SendQueue } from './send-queue.ts';
import { badClient, type Negotiated } from './server-handshake.ts';
import { type ReadContext, ServerReads } from './server-reads.ts';
import {
  allocationFlags,
  type ContextStatus,
  CTX_DIRTY_BITMAP,
  descriptors,
  ReplyEncoder,
  ReplyMode,
} from './server-replies.ts';
import {
  attempt,
  costOf,
  type Refusal,
  type Request,
  validate,
  wireErrno,
} from './server-requests.ts';
import { decodeRequestHeader, requestHeaderBytes } from './wire.ts';
import { type WriteOutcome, WriteStream, type WriteStreamHost } from './write-stream.ts';

const EMPTY = Buffer.alloc(0);

/** What transmission needs from its connection (the socket's lifecycle is the connection's). */
export interface TransmissionLink {
  /** Requests served at once; at the limit the socket is not read. */
  readonly maxInFlight: number;
  /** Buffers for payloads and replies, shared by the server's connections. */
  readonly pool: BufferPool;
  /** Bytes received and not parsed yet. */
  readonly queue: ByteQueue;
  /** The queue's chunks are valid only while pump runs: payloads are copied out of them. */
  readonly receivedBorrowed: boolean;
  /** Requests are taken (not closing nor closed). */
  readonly active: boolean;
  readonly socketClosed: boolean;
  readonly readingPaused: boolean;
  pauseReading(): void;
  resumeReading(): void;
  /** No more requests are taken (DISC, or the client broke the protocol). */
  closing(): void;
  error(err: NbdError): void;
  /** Hard disconnect. */
  destroy(): void;
  /** A request is over while closing: the connection may finish. */
  idle(): void;
}

interface PendingWrite {
  readonly req: Request;
  readonly buf: Uint8Array;
  filled: number;
}

export class Transmission implements ReadContext {
  readonly export: ExportEntry;
  readonly replies: ReplyEncoder;
  readonly sendQueue: SendQueue;
  readonly account: BudgetAccount;
  readonly pool: BufferPool;
  /** Requests started and not done. */
  inFlight = 0;

  private readonly link: TransmissionLink;
  private readonly extended: boolean;
  /** Meta contexts of transmission (ids, in order). */
  private readonly contexts: number[];
  private readonly reads: ServerReads;
  private pendingWrite: PendingWrite | undefined;
  private skipBytes = 0;
  private afterSkip: (() => void) | undefined;
  private skipReq: Request | undefined;
  /** Streamed READs admitted and not done, and whether the slot they share is held. */
  private streamedReads = 0;
  private streamSlot = false;
  /** A streamed WRITE whose payload is still being taken from the socket. */
  private writeStream: WriteStream | undefined;

  constructor(
    link: TransmissionLink,
    agreed: Negotiated,
    sendQueue: SendQueue,
    account: BudgetAccount,
  ) {
    this.link = link;
    this.export = agreed.export;
    this.contexts = agreed.contexts;
    this.replies = new ReplyEncoder(agreed.mode);
    this.extended = agreed.mode === ReplyMode.EXTENDED;
    this.sendQueue = sendQueue;
    this.account = account;
    this.pool = link.pool;
    this.reads = new ServerReads(this);
  }

  /** The socket closed: what waits for the client is dropped, streams stop. */
  closed(): void {
    const pw = this.pendingWrite;
    if (pw !== undefined) {
      this.pendingWrite = undefined;
      this.free(pw.buf);
      this.done(pw.req);
    }
    const skipped = this.skipReq;
    if (skipped !== undefined) {
      this.afterSkip = undefined;
      this.skipReq = undefined;
      this.skipBytes = 0;
      this.done(skipped);
    }
    const ws = this.writeStream;
    this.writeStream = undefined;
    ws?.abort();
    this.reads.abort();
  }

  isClosed(): boolean {
    return this.link.socketClosed;
  }

  /**
   * Where the socket may read next, straight: the rest of the WRITE payload being
   * received, when at least `min` bytes and every byte received before it is taken
   * (read-router.ts).
   */
  payloadSpace(min: number): Uint8Array | undefined {
    const pw = this.pendingWrite;
    if (pw === undefined || this.link.queue.length > 0 || pw.buf.length - pw.filled < min) {
      return undefined;
    }
    return pw.buf.subarray(pw.filled);
  }

  /** `n` bytes of the pending payload were read into the space payloadSpace gave. */
  payloadReceived(n: number): void {
    this.pendingWrite!.filled += n;
    this.pump();
  }

  /** Takes what the client sent: payloads being received, then new requests. */
  pump(): void {
    const link = this.link;
    const q = link.queue;
    while (link.active) {
      if (this.skipBytes > 0) {
        this.skipBytes -= q.skip(this.skipBytes);
        if (this.skipBytes > 0) {
          link.resumeReading();
          return;
        }
        const then = this.afterSkip;
        this.afterSkip = undefined;
        then?.();
        continue;
      }
      const ws = this.writeStream;
      if (ws !== undefined) {
        if (!ws.consume(q)) {
          if (ws.waiting) link.pauseReading();
          else link.resumeReading();
          return;
        }
        this.writeStream = undefined;
        continue;
      }
      const pw = this.pendingWrite;
      if (pw !== undefined) {
        const n = Math.min(q.length, pw.buf.length - pw.filled);
        if (n > 0) q.copyInto(pw.buf, pw.filled, n);
        pw.filled += n;
        if (pw.filled < pw.buf.length) {
          link.resumeReading();
          return;
        }
        this.pendingWrite = undefined;
        this.startWrite(pw.req, pw.buf, true);
        continue;
      }
      if (this.inFlight >= link.maxInFlight) {
        link.pauseReading();
        return;
      }
      const headerBytes = requestHeaderBytes(this.extended);
      if (q.length < headerBytes) {
        link.resumeReading();
        return;
      }
      // The request's data must fit this connection's share of the memory budget: if
      // not, the socket is not read until it does (onRoom or a request of ours done).
      const header = q.peek(headerBytes);
      const [cost, streamed] = costOf(header, this.replies.mode, this.streamSlot);
      if (!this.account.admit(cost)) {
        link.pauseReading();
        return;
      }
      if (streamed) {
        // The stream slot: one piece for the streamed READ running, handed from one to
        // the next while any is pending (one runs at a time: it holds the send queue).
        this.streamedReads++;
        if (cost > 0) this.streamSlot = true;
      }
      try {
        q.skip(headerBytes);
        this.request(header, streamed ? 0 : cost, streamed);
      } catch (err) {
        // A bug or a target that threw where it should have rejected: this connection
        // goes, the server stays.
        link.closing();
        link.error(
          new NbdError('ERR_VMDISK_NBD_TARGET_ERROR', `request failed: ${String(err)}`, {
            cause: err,
          }),
        );
        link.destroy();
        return;
      }
    }
  }

  private request(h: Buffer, cost: number, streamed: boolean): void {
    const { magic, flags, type, offset, length } = decodeRequestHeader(h, this.extended);
    if (magic !== (this.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC)) {
      this.account.give(cost);
      if (streamed) this.streamedReadDone();
      this.violation(`bad request magic 0x${magic.toString(16)}`);
      return;
    }
    if (type === Command.DISC) {
      this.account.give(cost);
      this.disconnectRequested();
      return;
    }
    const payload =
      type === Command.WRITE || (this.extended && (flags & CommandFlag.PAYLOAD_LEN) !== 0)
        ? length
        : 0;
    const req: Request = {
      type,
      flags,
      ids: Buffer.from(h.subarray(8, 24)),
      offset,
      length,
      cost,
      streamed,
    };
    const exp = this.export;
    this.inFlight++;
    exp.stats.inFlight++;
    exp.stats.requests++;
    if (type < exp.stats.commands.length) exp.stats.commands[type]!++;
    let refusal: Refusal | undefined;
    try {
      refusal = validate(req, exp, this.replies.mode, this.contexts);
    } catch (err) {
      // size() threw: answered as the target failing (after the payload, if any).
      refusal = [wireErrno(err), `the target failed: ${String(err)}`];
    }
    if (payload > 0) {
      this.takePayload(req, payload, refusal);
      return;
    }
    if (refusal !== undefined) {
      this.replyError(req, refusal[0], refusal[1]);
      return;
    }
    if (type === Command.WRITE) {
      this.startWrite(req, EMPTY, false);
      return;
    }
    this.execute(req);
  }

  /** A request with a payload: received whole, streamed, or skipped when refused. */
  private takePayload(req: Request, payload: number, refused: Refusal | undefined): void {
    let refusal = refused;
    if (payload > MAX_PAYLOAD_BYTES) {
      // Never allocated nor skipped: refuse, then hard disconnect.
      this.link.closing();
      this.link.error(
        badClient(`a ${req.length}-byte payload (the limit is ${MAX_PAYLOAD_BYTES})`),
      );
      this.replyError(req, WireError.EOVERFLOW, 'payload too large', () => this.link.destroy());
      return;
    }
    const q = this.link.queue;
    if (refusal === undefined && payload > STREAM_PIECE) {
      this.streamWrite(req);
      return;
    }
    if (
      refusal === undefined &&
      this.export.target.allocBuffer === undefined &&
      !this.link.receivedBorrowed &&
      q.length >= payload
    ) {
      // A view of the received bytes: no copy, and not ours to recycle.
      this.startWrite(req, q.take(payload), false);
      return;
    }
    if (refusal === undefined) {
      try {
        this.pendingWrite = { req, buf: this.alloc(payload), filled: 0 };
        return;
      } catch (err) {
        refusal = [wireErrno(err), `no buffer for the payload: ${String(err)}`];
      }
    }
    const [errno, message] = refusal;
    this.skipBytes = payload;
    this.skipReq = req;
    this.afterSkip = () => {
      this.skipReq = undefined;
      this.replyError(req, errno, message);
    };
  }

  private execute(req: Request): void {
    const t = this.export.target;
    const { offset, length, flags } = req;
    const fua = (flags & CommandFlag.FUA) !== 0;
    switch (req.type) {
      case Command.READ:
        this.reads.read(req);
        return;
      case Command.FLUSH:
        this.complete(
          req,
          attempt(() => t.flush()),
        );
        return;
      case Command.TRIM:
        this.complete(
          req,
          attempt(() => t.trim(offset, length, { fua })),
        );
        return;
      case Command.WRITE_ZEROES: {
        const noHole = (flags & CommandFlag.NO_HOLE) !== 0;
        const fastZero = (flags & CommandFlag.FAST_ZERO) !== 0;
        const op = attempt(() => t.writeZeroes(offset, length, { fua, noHole, fastZero }));
        this.complete(req, op, () => {
          this.export.stats.bytesWritten += length;
        });
        return;
      }
      case Command.CACHE:
        this.complete(
          req,
          attempt(() => t.cache(offset, length)),
        );
        return;
      case Command.BLOCK_STATUS:
        this.blockStatus(req).catch((err: unknown) => this.targetFailed(req, err));
        return;
    }
  }

  /** Answers `req` once `op` settles (`ok` runs first on success). */
  private complete(req: Request, op: Promise<void> | undefined, ok?: () => void): void {
    if (op === undefined) {
      ok?.();
      this.replyOk(req);
      return;
    }
    op.then(
      () => {
        ok?.();
        this.replyOk(req);
      },
      (err: unknown) => this.targetFailed(req, err),
    );
  }

  targetFailed(req: Request, err: unknown): void {
    const errno = wireErrno(err);
    const message = err instanceof Error ? err.message : String(err);
    this.link.error(
      new NbdError(
        'ERR_VMDISK_NBD_TARGET_ERROR',
        `command ${req.type} at ${req.offset} length ${req.length}: ${message}`,
        { cause: err },
      ),
    );
    this.replyError(req, errno, message);
  }

  fatal(req: Request, err: unknown): void {
    this.link.error(
      new NbdError(
        'ERR_VMDISK_NBD_TARGET_ERROR',
        `read at ${req.offset} length ${req.length} failed after its reply began; disconnecting: ${String(err)}`,
        { cause: err },
      ),
    );
    this.link.destroy();
  }

  private async blockStatus(req: Request): Promise<void> {
    const t = this.export.target;
    const reqOne = (req.flags & CommandFlag.REQ_ONE) !== 0;
    const { offset, length } = req;
    const allocation = this.contexts.some((id) => id < CTX_DIRTY_BITMAP)
      ? t.blockStatus(offset, length)
      : undefined;
    const contexts = await Promise.all(
      this.contexts.map(async (id): Promise<ContextStatus> => {
        if (id >= CTX_DIRTY_BITMAP) {
          // A bitmap answers for the whole range asked for, as QEMU's does.
          const extents = await t.bitmapStatus(id - CTX_DIRTY_BITMAP, offset, length);
          const pairs = extents.map((e) => [e.length, e.dirty ? STATE_DIRTY : 0] as const);
          return [id, descriptors(pairs, reqOne)];
        }
        const extents = await allocation!;
        return [
          id,
          descriptors(
            extents.map((e) => [e.length, allocationFlags(id, e)]),
            reqOne,
          ),
        ];
      }),
    );
    this.send(req, this.replies.chunks(req.ids, this.replies.blockStatus(contexts)));
  }

  /** Runs a WRITE whose payload is in `buf` (`owned`: from alloc, to be freed). */
  private startWrite(req: Request, buf: Uint8Array, owned: boolean): void {
    const exp = this.export;
    const t = exp.target;
    if (req.length === 0) {
      if (owned) this.free(buf);
      this.replyOk(req);
      return;
    }
    const fua = (req.flags & CommandFlag.FUA) !== 0;
    const op = attempt(() => t.write(req.offset, buf, { fua }));
    op.then(
      () => {
        if (owned) this.free(buf);
        exp.stats.bytesWritten += req.length;
        this.replyOk(req);
      },
      (err: unknown) => {
        if (owned) this.free(buf);
        this.targetFailed(req, err);
      },
    );
  }

  /** A WRITE whose payload is larger than STREAM_PIECE: taken and written in pieces. */
  private streamWrite(req: Request): void {
    const exp = this.export;
    const t = exp.target;
    const fua = (req.flags & CommandFlag.FUA) !== 0;
    const host: WriteStreamHost = {
      target: t,
      account: this.account,
      alloc: (n) => this.alloc(n),
      free: (b) => this.free(b),
      resume: () => {
        if (this.link.active) this.pump();
      },
    };
    // With FUA: the pieces are written without it, then one flush covers them all.
    const done = (outcome: WriteOutcome): void => {
      if (outcome === 'aborted') {
        this.done(req);
      } else if (outcome !== 'written') {
        this.targetFailed(req, outcome.error);
      } else {
        this.complete(req, fua ? attempt(() => t.flush()) : undefined, () => {
          exp.stats.bytesWritten += req.length;
        });
      }
    };
    this.writeStream = new WriteStream(host, req.offset, req.length, done);
  }

  /** A buffer for request data: the target's (e.g. aligned arena memory) or the pool's. */
  alloc(length: number): Uint8Array {
    const t = this.export.target;
    return t.allocBuffer ? t.allocBuffer(length) : this.pool.get(length);
  }

  /** Gives back a buffer from alloc once nothing refers to it any more. */
  free(buf: Uint8Array): void {
    const t = this.export.target;
    if (t.allocBuffer) t.releaseBuffer?.(buf);
    else this.pool.put(buf);
  }

  // ---- replies ----

  send(req: Request, buffers: readonly Uint8Array[], sent?: () => void): void {
    this.sendQueue.send(buffers, () => {
      sent?.();
      this.done(req);
    });
  }

  private replyOk(req: Request): void {
    this.send(req, this.replies.ok(req.ids));
  }

  private replyError(req: Request, errno: number, message: string, sent?: () => void): void {
    this.export.stats.errors++;
    this.send(req, this.replies.error(req.ids, errno, message), sent);
  }

  /** A request is over (its reply sent or dropped). */
  done(req: Request): void {
    this.account.give(req.cost);
    if (req.streamed) this.streamedReadDone();
    this.inFlight--;
    this.export.stats.inFlight--;
    const link = this.link;
    if (link.active) {
      if (link.readingPaused || link.queue.length > 0) this.pump();
    } else {
      link.idle();
    }
  }

  /** The last streamed READ pending gives the stream slot back. */
  private streamedReadDone(): void {
    if (--this.streamedReads === 0 && this.streamSlot) {
      this.streamSlot = false;
      this.account.give(STREAM_PIECE);
    }
  }

  private violation(message: string): void {
    this.link.closing();
    this.link.error(badClient(message));
    this.link.destroy();
  }

  /** NBD_CMD_DISC: finish what is in flight, then close; no reply. */
  private disconnectRequested(): void {
    this.link.closing();
    this.link.queue.clear();
    this.link.idle();
  }
}
