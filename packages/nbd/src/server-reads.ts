// NBD_CMD_READ on the server: a read up to STREAM_PIECE is answered in one go (one simple
// reply, one OFFSET_DATA chunk, or with structured replies data and OFFSET_HOLE chunks
// for the holes the target reports cheaply); a larger one is streamed in pieces
// (read-stream.ts), one stream at a time per connection since it holds the send queue.
// A read of at least FILE_SEND_MIN whose bytes the target has in a cached file
// (ExportTarget.fileRange) is answered from the file with sendfile, when the connection
// can (send-queue.ts): the data is never copied into a buffer of ours.

import { getSystemErrorName } from 'node:util';
import type { BufferPool } from './buffer-pool.ts';
import { NbdSystemError } from './errors.ts';
import type { ExportEntry } from './export-entry.ts';
import type { Extent, SparsePiece } from './export-target.ts';
import { type BudgetAccount, STREAM_PIECE } from './memory-budget.ts';
import { CommandFlag } from './protocol.ts';
import { ReadStream, type Segment, type StreamHost, type StreamOutcome } from './read-stream.ts';
import type { SendQueue } from './send-queue.ts';
import type { ReplyEncoder } from './server-replies.ts';
import { attempt, describeFailure, type Request } from './server-requests.ts';

/** What reads need from the transmission they belong to. */
export interface ReadContext {
  readonly export: ExportEntry;
  readonly replies: ReplyEncoder;
  readonly sendQueue: SendQueue;
  readonly account: BudgetAccount;
  readonly pool: BufferPool;
  /** The connection's socket is closed. */
  isClosed(): boolean;
  /** A buffer for request data (the target's or the pool's), and its return. */
  alloc(length: number): Uint8Array;
  free(buf: Uint8Array): void;
  /** Sends one reply; the request is done once it is out (`sent` runs first). */
  send(req: Request, buffers: readonly Uint8Array[], sent?: () => void): void;
  /** The request is over without a reply of ours (or its reply was answered already). */
  done(req: Request): void;
  /** Answers the request with the target's failure. */
  targetFailed(req: Request, err: unknown): void;
  /** A streamed read failed after its reply began: the client must go. */
  fatal(req: Request, err: unknown): void;
}

/**
 * The least READ answered from a file: below it, reading into a buffer costs less than the
 * system calls of a separate send (the buffer's reply joins the turn's one writev).
 */
const FILE_SEND_MIN = 32 * 1024;

export class ServerReads {
  private readonly ctx: ReadContext;
  /** Streamed READs in order; the first one holds the send queue. */
  private readonly streams: ReadStream[] = [];

  constructor(ctx: ReadContext) {
    this.ctx = ctx;
  }

  /** The connection closed: the streams stop once what they have out is back. */
  abort(): void {
    for (const stream of [...this.streams]) stream.abort();
  }

  read(req: Request): void {
    const ctx = this.ctx;
    if (req.length === 0) {
      ctx.send(req, ctx.replies.emptyRead(req.ids));
      return;
    }
    if (req.length > STREAM_PIECE) {
      this.streamRead(req).catch((err: unknown) => ctx.targetFailed(req, err));
      return;
    }
    if (req.length >= FILE_SEND_MIN && ctx.sendQueue.sendsFiles && this.fileRead(req)) return;
    // A target without block status has no holes to report: its data in one piece.
    if (ctx.replies.structured && (req.flags & CommandFlag.DF) === 0 && this.holes) {
      this.sparseRead(req).catch((err: unknown) => ctx.targetFailed(req, err));
      return;
    }
    this.denseRead(req);
  }

  /**
   * The range from the file the target says holds it (ExportTarget.fileRange), in one
   * simple reply or one OFFSET_DATA chunk: the header and as much of the data as the
   * socket takes now are sent at once, the rest read from the file and queued. False:
   * the target has no such file for it.
   */
  private fileRead(req: Request): boolean {
    const ctx = this.ctx;
    const exp = ctx.export;
    const range = exp.target.fileRange?.(req.offset, req.length);
    if (range === undefined) return false;
    const replies = ctx.replies;
    const header = Buffer.allocUnsafe(replies.readHeaderBytes);
    replies.readHeader(header, req.ids, req.length);
    const q = ctx.sendQueue;
    const out = q.sendFile(header, range.fd, range.offset, req.length);
    exp.stats.bytesRead += req.length;
    if (out === header.byteLength + req.length) {
      queueMicrotask(() => ctx.done(req));
      return true;
    }
    // The rest: what the socket did not take, read from the file (its pages are cached).
    const from = Math.max(out - header.byteLength, 0);
    const rest = ctx.alloc(req.length - from);
    let got = 0;
    while (got < rest.byteLength) {
      const n = q.readFile(range.fd, rest.subarray(got), range.offset + from + got);
      if (n < 0) {
        ctx.free(rest);
        const code = getSystemErrorName(n);
        const cause = { code, errno: n, syscall: 'pread', message: code };
        const err = new NbdSystemError(
          'ERR_VMDISK_NBD_FILE_ERROR',
          "reading the export's file",
          cause,
        );
        if (out === 0) {
          ctx.targetFailed(req, err);
        } else {
          ctx.fatal(req, err);
          queueMicrotask(() => ctx.done(req));
        }
        return true;
      }
      if (n === 0) {
        rest.fill(0, got); // past the file's end: zeros, as a read there gives
        break;
      }
      got += n;
    }
    const buffers = out < header.byteLength ? [header.subarray(out), rest] : [rest];
    ctx.send(req, buffers, () => ctx.free(rest));
    return true;
  }

  /** The whole range as one piece of data: one simple reply or one OFFSET_DATA chunk. */
  private denseRead(req: Request): void {
    const ctx = this.ctx;
    const exp = ctx.export;
    const t = exp.target;
    const replies = ctx.replies;
    const headerBytes = replies.readHeaderBytes;
    let whole: Buffer | undefined;
    let data: Uint8Array;
    if (t.allocBuffer) {
      try {
        data = t.allocBuffer(req.length);
      } catch (err) {
        ctx.targetFailed(req, err);
        return;
      }
    } else {
      // Header and data in one buffer: one write.
      whole = ctx.pool.get(headerBytes + req.length);
      data = whole.subarray(headerBytes);
    }
    attempt(() => t.read(req.offset, data)).then(
      () => {
        exp.stats.bytesRead += req.length;
        const header = whole ?? Buffer.allocUnsafe(headerBytes);
        replies.readHeader(header, req.ids, req.length);
        ctx.send(req, whole !== undefined ? [whole] : [header, data], () =>
          ctx.free(whole ?? data),
        );
      },
      (err: unknown) => {
        ctx.free(whole ?? data);
        ctx.targetFailed(req, err);
      },
    );
  }

  /**
   * A READ larger than STREAM_PIECE, streamed in pieces (read-stream.ts). Structured
   * without DF: the holes the target reports cheaply go out as OFFSET_HOLE chunks.
   */
  private async streamRead(req: Request): Promise<void> {
    const ctx = this.ctx;
    const t = ctx.export.target;
    const single = !ctx.replies.structured || (req.flags & CommandFlag.DF) !== 0;
    const segments: Segment[] =
      !single && this.holes
        ? await this.segments(req.offset, req.length)
        : [{ offset: req.offset, length: req.length, zero: false }];
    const host: StreamHost = {
      target: t,
      account: ctx.account,
      sendQueue: ctx.sendQueue,
      isClosed: () => ctx.isClosed(),
      alloc: (n) => ctx.alloc(n),
      free: (b) => ctx.free(b),
      header: (what) => ctx.replies.streamHeader(req.ids, req.length, what),
      fatal: (err) => ctx.fatal(req, err),
      describe: describeFailure,
    };
    const stream = new ReadStream(host, segments, single, (outcome) =>
      this.streamDone(req, stream, outcome),
    );
    this.streams.push(stream);
    if (ctx.isClosed()) stream.abort();
    else if (this.streams[0] === stream) stream.start();
  }

  private streamDone(req: Request, stream: ReadStream, outcome: StreamOutcome): void {
    const ctx = this.ctx;
    const exp = ctx.export;
    const i = this.streams.indexOf(stream);
    if (i >= 0) this.streams.splice(i, 1);
    if (outcome === 'sent') {
      exp.stats.bytesRead += req.length;
      ctx.done(req);
    } else if (outcome === 'aborted') {
      ctx.done(req);
    } else if (outcome.answered) {
      exp.stats.errors++;
      ctx.done(req);
    } else {
      ctx.targetFailed(req, outcome.error);
    }
    const next = this.streams[0];
    if (i === 0 && next !== undefined && !ctx.isClosed()) next.start();
  }

  /**
   * A structured read asks the target once for data and holes (ExportTarget.readSparse):
   * the holes go out as OFFSET_HOLE chunks and take no memory.
   */
  private async sparseRead(req: Request): Promise<void> {
    const ctx = this.ctx;
    const exp = ctx.export;
    const handed: Uint8Array[] = [];
    const alloc = (n: number): Uint8Array => {
      const buf = ctx.alloc(n);
      handed.push(buf);
      return buf;
    };
    const freeAll = (): void => {
      for (const b of handed) ctx.free(b);
    };
    let pieces: SparsePiece[];
    try {
      pieces = await exp.target.readSparse(req.offset, req.length, alloc);
    } catch (err) {
      freeAll();
      throw err;
    }
    exp.stats.bytesRead += req.length;
    const replies = ctx.replies;
    const chunks = pieces.map((p) =>
      p.data !== undefined
        ? replies.dataChunk(p.offset, p.data)
        : replies.holeChunk(p.offset, p.length),
    );
    ctx.send(req, replies.chunks(req.ids, chunks), freeAll);
  }

  /** The range as data and zero segments, adjacent ones of a kind merged. */
  private async segments(offset: number, length: number): Promise<Segment[]> {
    const segments: Segment[] = [];
    let pos = offset;
    for (const e of await this.extents(offset, length)) {
      const last = segments[segments.length - 1];
      if (last !== undefined && last.zero === e.zero) last.length += e.length;
      else segments.push({ offset: pos, length: e.length, zero: e.zero });
      pos += e.length;
    }
    return segments;
  }

  /** Extents covering exactly [offset, offset+length), asked of the target in pieces. */
  private async extents(offset: number, length: number): Promise<Extent[]> {
    const t = this.ctx.export.target;
    const out: Extent[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      // Only holes that are cheap to know are worth skipping in a READ.
      for (const e of await t.blockStatus(pos, end - pos, { wantZero: false })) {
        out.push(e);
        pos += e.length;
      }
    }
    return out;
  }

  /** The target reports block status: a read may skip its holes. */
  private get holes(): boolean {
    return this.ctx.export.target.features.blockStatus;
  }
}
