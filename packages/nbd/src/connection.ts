// One client connection of the NBD server: the fixed newstyle negotiation, then the
// transmission phase. One receive loop parses requests and starts each on its own (up to
// maxInFlight, and while the server's memory budget admits its data; otherwise the socket
// is no longer read); replies leave through the connection's one send queue. READs and
// WRITEs larger than STREAM_PIECE are streamed in pieces (read-stream.ts,
// write-stream.ts).

import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { BufferPool } from './buffer-pool.ts';
import { ByteQueue } from './byte-queue.ts';
import { NbdError } from './errors.ts';
import type { BlockSizeConstraints, ExportTarget, Extent } from './export-target.ts';
import { type BudgetAccount, type MemoryBudget, STREAM_PIECE } from './memory-budget.ts';
import {
  ChunkType,
  Command,
  CommandFlag,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_HEADER_BYTES,
  EXTENDED_REQUEST_MAGIC,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  MAX_PAYLOAD_BYTES,
  MAX_STRING_BYTES,
  META_CONTEXT_ALLOCATION_DEPTH,
  META_CONTEXT_BASE_ALLOCATION,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  REPLY_FLAG_DONE,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlag,
  WireError,
} from './protocol.ts';
import { ReadStream, type Segment, type StreamHost, type StreamOutcome } from './read-stream.ts';
import { SendQueue } from './send-queue.ts';
import { type ServerTls, startServerTls } from './server-tls.ts';
import { type WriteOutcome, WriteStream, type WriteStreamHost } from './write-stream.ts';

/** Per-export counters. */
export interface ExportStats {
  /** Requests received (every command but DISC). */
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests answered with an error. */
  errors: number;
  /** Requests being served now. */
  inFlight: number;
  /** Connections in transmission on this export now. */
  connections: number;
}

/** An export as the server holds it. */
export interface ExportEntry {
  readonly name: string;
  readonly description: string;
  readonly target: ExportTarget;
  readonly writable: boolean;
  readonly multiConn: boolean;
  readonly blockSize: BlockSizeConstraints;
  readonly stats: ExportStats;
  readonly connections: Set<Connection>;
  /** removeExport was called: no new clients. */
  removing: boolean;
}

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly tls: ServerTls;
  readonly handshakeTimeoutMs: number;
  readonly maxInFlight: number;
  /** The memory budget for request data, shared by the server's connections. */
  readonly budget: MemoryBudget;
  /** Buffers for payloads and replies, shared by the server's connections. */
  readonly pool: BufferPool;
  /** The export a client asking for `name` gets ('' is the default export), if any. */
  findExport(name: string): ExportEntry | undefined;
  /** The exports NBD_OPT_LIST shows. */
  listExports(): Iterable<ExportEntry>;
  /** The connection entered transmission on `conn.export`. */
  attached(conn: Connection): void;
  /** The connection is closed and nothing of it is in flight any more. */
  closed(conn: Connection): void;
  error(conn: Connection, err: NbdError): void;
}

/** Option data beyond this is a hard disconnect (never an allocation). */
export const MAX_OPTION_BYTES = 64 * 1024;

const MODE_SIMPLE = 0;
const MODE_STRUCTURED = 1;
const MODE_EXTENDED = 2;

const CTX_BASE_ALLOCATION = 1;
const CTX_ALLOCATION_DEPTH = 2;

const ZEROES_124 = Buffer.alloc(124);
const EMPTY = Buffer.alloc(0);

interface Request {
  readonly type: number;
  readonly flags: number;
  /** The cookie (8 bytes) then the offset as sent (8 bytes), for the reply headers. */
  readonly ids: Buffer;
  readonly offset: number;
  readonly length: number;
  /** Bytes of the memory budget it holds until done (one piece for a streamed WRITE). */
  readonly cost: number;
  /** A streamed READ: it runs on the connection's stream slot. */
  readonly streamed: boolean;
}

interface PendingWrite {
  readonly req: Request;
  readonly buf: Uint8Array;
  filled: number;
}

class Closed extends Error {}

const badClient = (message: string): NbdError => new NbdError('ERR_VMDISK_NBD_BAD_CLIENT', message);

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A string of the protocol (UTF-8, no NUL), or undefined if it is not one. */
function decodeString(bytes: Uint8Array): string | undefined {
  if (bytes.length > MAX_STRING_BYTES || bytes.includes(0)) return undefined;
  try {
    return utf8.decode(bytes);
  } catch {
    return undefined;
  }
}

/** The NBD errno for an error a target rejected with (EIO for anything unknown). */
export function wireErrno(err: unknown): number {
  const e = err as { errnoName?: unknown; code?: unknown } | null;
  const name =
    typeof e?.errnoName === 'string' ? e.errnoName : typeof e?.code === 'string' ? e.code : '';
  switch (name) {
    case 'EROFS':
    case 'EACCES':
      return WireError.EPERM;
    case 'EDQUOT':
    case 'EFBIG':
      return WireError.ENOSPC;
    case 'EOPNOTSUPP':
      return WireError.ENOTSUP;
    default:
      return (WireError as Record<string, number>)[name] ?? WireError.EIO;
  }
}

const errnoError = (errnoName: string, message: string): Error =>
  Object.assign(new Error(message), { errnoName });

export class Connection {
  readonly id: number;
  readonly remoteAddress: string;
  readonly remotePort: number | undefined;
  /** The export chosen (set when transmission starts). */
  export: ExportEntry | undefined;
  tlsActive = false;

  private readonly host: ConnectionHost;
  private readonly raw: Socket;
  private socket: Duplex;
  private sendQueue: SendQueue;
  private readonly q = new ByteQueue();
  private phase: 'negotiation' | 'transmission' | 'closing' | 'closed' = 'negotiation';
  private mode = MODE_SIMPLE;
  private fixedNewstyle = false;
  private noZeroes = false;
  private meta: { exportName: string; ids: number[] } | undefined;
  /** Meta contexts of transmission (ids, in order). */
  private contexts: number[] = [];
  private inFlight = 0;
  private readingPaused = false;
  private waiter:
    | { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  private timer: NodeJS.Timeout | undefined;
  private pendingWrite: PendingWrite | undefined;
  private skipBytes = 0;
  private afterSkip: (() => void) | undefined;
  private skipReq: Request | undefined;
  /** This connection's part of the memory budget. */
  private readonly account: BudgetAccount;
  /** Streamed READs in order; the first one holds the send queue. */
  private readonly streams: ReadStream[] = [];
  /** Streamed READs admitted and not done, and whether the slot they share is held. */
  private streamedReads = 0;
  private streamSlot = false;
  /** A streamed WRITE whose payload is still being taken from the socket. */
  private writeStream: WriteStream | undefined;
  private socketClosed = false;
  private finalized = false;

  constructor(id: number, raw: Socket, host: ConnectionHost) {
    this.id = id;
    this.raw = raw;
    this.socket = raw;
    this.host = host;
    this.account = host.budget.account(this.onRoom);
    this.remoteAddress = raw.remoteAddress ?? 'unix';
    this.remotePort = raw.remotePort;
    this.sendQueue = new SendQueue(raw);
    raw.setNoDelay?.(true);
    // Idle clients may stay for ever; dead ones are found out and dropped.
    raw.setKeepAlive?.(true, 60_000);
    raw.on('data', this.onData);
    raw.on('error', this.onSocketError);
    raw.on('close', this.onClose);
    this.timer = setTimeout(() => {
      this.host.error(
        this,
        new NbdError(
          'ERR_VMDISK_NBD_HANDSHAKE_TIMEOUT',
          `the client did not finish negotiating within ${this.host.handshakeTimeoutMs} ms`,
        ),
      );
      this.destroy();
    }, this.host.handshakeTimeoutMs);
    this.negotiate().catch((err: unknown) => {
      if (err instanceof Closed) return;
      this.host.error(
        this,
        err instanceof NbdError ? err : badClient(`negotiation failed: ${String(err)}`),
      );
      this.destroy();
    });
  }

  /** The client asked to disconnect (NBD_CMD_DISC), broke the protocol or is gone. */
  get leaving(): boolean {
    return this.phase === 'closing' || this.phase === 'closed';
  }

  /** Hard disconnect: the socket goes at once; what is in flight completes unanswered. */
  destroy(): void {
    this.socket.destroy();
    if (this.socket !== this.raw) this.raw.destroy();
  }

  // ---- receiving ----

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closing' || this.phase === 'closed') return;
    this.q.push(chunk);
    if (this.phase === 'negotiation') {
      const w = this.waiter;
      if (w !== undefined && this.q.length >= w.n) {
        this.waiter = undefined;
        w.resolve(this.q.take(w.n));
      }
    } else {
      this.pump();
    }
  };

  private readonly onSocketError = (err: Error): void => {
    this.host.error(
      this,
      new NbdError('ERR_VMDISK_NBD_SOCKET_ERROR', `socket error: ${err.message}`, { cause: err }),
    );
  };

  private readonly onClose = (): void => {
    if (this.socketClosed) return;
    this.socketClosed = true;
    this.phase = 'closed';
    clearTimeout(this.timer);
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(new Closed());
    this.q.clear();
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
    for (const stream of [...this.streams]) stream.abort();
    this.account.close();
    this.maybeFinalize();
  };

  /** The memory budget may have room for what this connection waits for. */
  private readonly onRoom = (): void => {
    if (this.phase === 'transmission') this.pump();
  };

  private read(n: number): Promise<Buffer> {
    if (this.q.length >= n) return Promise.resolve(this.q.take(n));
    if (this.socketClosed) return Promise.reject(new Closed());
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  private pauseReading(): void {
    if (!this.readingPaused) {
      this.readingPaused = true;
      this.socket.pause();
    }
  }

  private resumeReading(): void {
    if (this.readingPaused) {
      this.readingPaused = false;
      this.socket.resume();
    }
  }

  // ---- negotiation ----

  private async negotiate(): Promise<void> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.raw.write(greeting);

    const clientFlags = (await this.read(4)).readUInt32BE(0);
    if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
      throw badClient(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.fixedNewstyle = (clientFlags & FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    const tlsMode = this.host.tls.mode;
    if (tlsMode === 'require' && !this.fixedNewstyle) {
      throw badClient('TLS is required and the client does not speak fixed newstyle');
    }

    for (;;) {
      const header = await this.read(16);
      if (header.readBigUInt64BE(0) !== IHAVEOPT) throw badClient('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        throw badClient(`option ${option} claims ${length} bytes of data`);
      }
      const data = length > 0 ? await this.read(length) : EMPTY;
      if (!this.fixedNewstyle && option !== Option.EXPORT_NAME) {
        throw badClient(`option ${option} from a client without fixed newstyle`);
      }
      if (tlsMode === 'require' && !this.tlsActive) {
        if (option === Option.EXPORT_NAME) throw badClient('NBD_OPT_EXPORT_NAME before TLS');
        if (option !== Option.STARTTLS && option !== Option.ABORT) {
          this.optReply(option, OptionReply.ERR_TLS_REQD, 'TLS is required');
          continue;
        }
      }
      switch (option) {
        case Option.EXPORT_NAME: {
          // Its reply cannot say anything about extended headers (qemu also hangs up).
          if (this.mode === MODE_EXTENDED) {
            throw badClient('NBD_OPT_EXPORT_NAME after extended headers were negotiated');
          }
          const name = decodeString(data);
          if (name === undefined) throw badClient('NBD_OPT_EXPORT_NAME with a bad name');
          const exp = this.host.findExport(name);
          if (exp === undefined) throw badClient(`NBD_OPT_EXPORT_NAME: no export "${name}"`);
          const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
          reply.writeBigUInt64BE(BigInt(exp.target.size()), 0);
          reply.writeUInt16BE(this.transmissionFlags(exp), 8);
          if (!this.noZeroes) ZEROES_124.copy(reply, 10);
          this.enterTransmission(exp, reply);
          return;
        }
        case Option.ABORT:
          this.optReply(option, OptionReply.ACK);
          this.phase = 'closing';
          this.maybeFinalize();
          throw new Closed();
        case Option.LIST:
          if (length !== 0) {
            this.optReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const exp of this.host.listExports()) {
            const name = Buffer.from(exp.name, 'utf8');
            const desc = Buffer.from(exp.description, 'utf8');
            const body = Buffer.alloc(4 + name.length + desc.length);
            body.writeUInt32BE(name.length, 0);
            name.copy(body, 4);
            desc.copy(body, 4 + name.length);
            this.optReply(option, OptionReply.SERVER, body);
          }
          this.optReply(option, OptionReply.ACK);
          break;
        case Option.STARTTLS:
          await this.startTls(length);
          break;
        case Option.INFO:
        case Option.GO:
          if (this.infoOrGo(option, data)) return;
          break;
        case Option.STRUCTURED_REPLY:
          if (length !== 0) {
            this.optReply(option, OptionReply.ERR_INVALID, 'takes no data');
          } else if (this.mode === MODE_EXTENDED) {
            this.optReply(option, OptionReply.ERR_EXT_HEADER_REQD, 'extended headers in use');
          } else if (this.mode === MODE_STRUCTURED) {
            this.optReply(option, OptionReply.ERR_INVALID, 'already negotiated');
          } else {
            this.mode = MODE_STRUCTURED;
            this.optReply(option, OptionReply.ACK);
          }
          break;
        case Option.EXTENDED_HEADERS:
          if (length !== 0) {
            this.optReply(option, OptionReply.ERR_INVALID, 'takes no data');
          } else if (this.mode === MODE_EXTENDED) {
            this.optReply(option, OptionReply.ERR_INVALID, 'already negotiated');
          } else {
            this.mode = MODE_EXTENDED;
            this.optReply(option, OptionReply.ACK);
          }
          break;
        case Option.LIST_META_CONTEXT:
        case Option.SET_META_CONTEXT:
          this.metaContext(option, data);
          break;
        default:
          this.optReply(option, OptionReply.ERR_UNSUP, `option ${option} is not supported`);
      }
    }
  }

  private optReply(option: number, type: number, data?: Buffer | string): void {
    const body = typeof data === 'string' ? Buffer.from(data, 'utf8') : (data ?? EMPTY);
    const buf = Buffer.allocUnsafe(20 + body.length);
    buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    buf.writeUInt32BE(option, 8);
    buf.writeUInt32BE(type, 12);
    buf.writeUInt32BE(body.length, 16);
    body.copy(buf, 20);
    this.socket.write(buf);
  }

  private async startTls(length: number): Promise<void> {
    const option = Option.STARTTLS;
    if (length !== 0) {
      this.optReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      return;
    }
    if (this.host.tls.mode === 'off') {
      this.optReply(option, OptionReply.ERR_POLICY, 'TLS is not enabled on this server');
      return;
    }
    if (this.tlsActive) {
      this.optReply(option, OptionReply.ERR_INVALID, 'TLS is already active');
      return;
    }
    if (this.q.length > 0) throw badClient('data after NBD_OPT_STARTTLS before its reply');
    const raw = this.raw;
    raw.removeListener('data', this.onData);
    raw.pause();
    this.optReply(option, OptionReply.ACK);
    const secure = await startServerTls(raw, this.host.tls);
    if (this.socketClosed) throw new Closed();
    this.socket = secure;
    this.sendQueue = new SendQueue(secure);
    secure.on('data', this.onData);
    secure.on('error', this.onSocketError);
    secure.on('close', this.onClose);
    this.tlsActive = true;
    // Everything negotiated in plain text is forgotten.
    this.mode = MODE_SIMPLE;
    this.meta = undefined;
  }

  /** NBD_OPT_INFO and NBD_OPT_GO; true when transmission starts. */
  private infoOrGo(option: number, data: Buffer): boolean {
    const invalid = (why: string): false => {
      this.optReply(option, OptionReply.ERR_INVALID, why);
      return false;
    };
    if (data.length < 6) return invalid('option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_STRING_BYTES) return invalid('export name too long');
    if (4 + nameLength + 2 > data.length) return invalid('export name overruns the option');
    const name = decodeString(data.subarray(4, 4 + nameLength));
    if (name === undefined) return invalid('export name is not a valid string');
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) {
      return invalid('information request count does not match the option length');
    }
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(6 + nameLength + 2 * i));
    const exp = this.host.findExport(name);
    if (exp === undefined) {
      this.optReply(option, OptionReply.ERR_UNKNOWN, `no export "${name}"`);
      return false;
    }
    if (wanted.has(Info.NAME)) {
      const n = Buffer.from(exp.name, 'utf8');
      const body = Buffer.alloc(2 + n.length);
      body.writeUInt16BE(Info.NAME, 0);
      n.copy(body, 2);
      this.optReply(option, OptionReply.INFO, body);
    }
    if (wanted.has(Info.DESCRIPTION) && exp.description !== '') {
      const d = Buffer.from(exp.description, 'utf8');
      const body = Buffer.alloc(2 + d.length);
      body.writeUInt16BE(Info.DESCRIPTION, 0);
      d.copy(body, 2);
      this.optReply(option, OptionReply.INFO, body);
    }
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(Info.BLOCK_SIZE, 0);
    bs.writeUInt32BE(exp.blockSize.minimum, 2);
    bs.writeUInt32BE(exp.blockSize.preferred, 6);
    bs.writeUInt32BE(exp.blockSize.maximum, 10);
    this.optReply(option, OptionReply.INFO, bs);
    const info = Buffer.alloc(12);
    info.writeUInt16BE(Info.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.target.size()), 2);
    info.writeUInt16BE(this.transmissionFlags(exp), 10);
    this.optReply(option, OptionReply.INFO, info);
    if (option === Option.INFO) {
      this.optReply(option, OptionReply.ACK);
      return false;
    }
    const ack = Buffer.alloc(20);
    ack.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    ack.writeUInt32BE(option, 8);
    ack.writeUInt32BE(OptionReply.ACK, 12);
    this.enterTransmission(exp, ack);
    return true;
  }

  private metaContext(option: number, data: Buffer): void {
    const invalid = (why: string): void => this.optReply(option, OptionReply.ERR_INVALID, why);
    if (option === Option.SET_META_CONTEXT && this.mode === MODE_SIMPLE) {
      invalid('structured replies are not negotiated');
      return;
    }
    if (data.length < 8) {
      invalid('option data too short');
      return;
    }
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_STRING_BYTES || 4 + nameLength + 4 > data.length) {
      invalid('bad export name length');
      return;
    }
    const name = decodeString(data.subarray(4, 4 + nameLength));
    if (name === undefined) {
      invalid('export name is not a valid string');
      return;
    }
    const count = data.readUInt32BE(4 + nameLength);
    const queries: string[] = [];
    let at = 8 + nameLength;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) {
        invalid('query overruns the option');
        return;
      }
      const len = data.readUInt32BE(at);
      at += 4;
      if (len > MAX_STRING_BYTES || at + len > data.length) {
        invalid('bad query length');
        return;
      }
      const query = decodeString(data.subarray(at, at + len));
      if (query === undefined) {
        invalid('query is not a valid string');
        return;
      }
      queries.push(query);
      at += len;
    }
    if (at !== data.length) {
      invalid('trailing bytes after the queries');
      return;
    }
    const exp = this.host.findExport(name);
    if (exp === undefined) {
      this.optReply(option, OptionReply.ERR_UNKNOWN, `no export "${name}"`);
      return;
    }
    const available: Array<[number, string]> = [
      [CTX_BASE_ALLOCATION, META_CONTEXT_BASE_ALLOCATION],
    ];
    if (exp.target.reportsDepth && exp.target.blockStatus) {
      available.push([CTX_ALLOCATION_DEPTH, META_CONTEXT_ALLOCATION_DEPTH]);
    }
    const list = option === Option.LIST_META_CONTEXT;
    const chosen = new Map<number, string>();
    if (list && queries.length === 0) for (const [id, n] of available) chosen.set(id, n);
    for (const query of queries) {
      for (const [id, n] of available) {
        const namespaceQuery = list && query.endsWith(':') && n.startsWith(query);
        if (n === query || namespaceQuery) chosen.set(id, n);
      }
    }
    for (const [id, n] of chosen) {
      const nb = Buffer.from(n, 'utf8');
      const body = Buffer.alloc(4 + nb.length);
      body.writeUInt32BE(list ? 0 : id, 0);
      nb.copy(body, 4);
      this.optReply(option, OptionReply.META_CONTEXT, body);
    }
    if (!list) this.meta = { exportName: exp.name, ids: [...chosen.keys()].sort() };
    this.optReply(option, OptionReply.ACK);
  }

  private transmissionFlags(exp: ExportEntry): number {
    const t = exp.target;
    let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
    if (!exp.writable) {
      flags |= TransmissionFlag.READ_ONLY;
    } else {
      flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES;
      if (t.trim) flags |= TransmissionFlag.SEND_TRIM;
      if (t.writeZeroes) flags |= TransmissionFlag.SEND_FAST_ZERO;
    }
    if (this.mode !== MODE_SIMPLE) flags |= TransmissionFlag.SEND_DF;
    if (t.cache) flags |= TransmissionFlag.SEND_CACHE;
    if (exp.multiConn && (t.multiConnSafe === true || !exp.writable)) {
      flags |= TransmissionFlag.CAN_MULTI_CONN;
    }
    return flags;
  }

  private enterTransmission(exp: ExportEntry, reply: Buffer): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.export = exp;
    this.contexts =
      this.meta !== undefined && this.meta.exportName === exp.name ? this.meta.ids : [];
    this.phase = 'transmission';
    this.socket.write(reply);
    this.host.attached(this);
    if (this.q.length > 0) this.pump();
  }

  // ---- transmission ----

  private pump(): void {
    const q = this.q;
    while (this.phase === 'transmission') {
      if (this.skipBytes > 0) {
        this.skipBytes -= q.skip(this.skipBytes);
        if (this.skipBytes > 0) {
          this.resumeReading();
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
          if (ws.waiting) this.pauseReading();
          else this.resumeReading();
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
          this.resumeReading();
          return;
        }
        this.pendingWrite = undefined;
        this.startWrite(pw.req, pw.buf, true);
        continue;
      }
      if (this.inFlight >= this.host.maxInFlight) {
        this.pauseReading();
        return;
      }
      const headerBytes =
        this.mode === MODE_EXTENDED ? EXTENDED_REQUEST_HEADER_BYTES : REQUEST_HEADER_BYTES;
      if (q.length < headerBytes) {
        this.resumeReading();
        return;
      }
      // The request's data must fit this connection's share of the memory budget: if
      // not, the socket is not read until it does (onRoom or a request of ours done).
      const header = q.peek(headerBytes);
      const [cost, streamed] = this.costOf(header);
      if (!this.account.admit(cost)) {
        this.pauseReading();
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
        this.phase = 'closing';
        this.host.error(
          this,
          new NbdError('ERR_VMDISK_NBD_TARGET_ERROR', `request failed: ${String(err)}`, {
            cause: err,
          }),
        );
        this.destroy();
        return;
      }
    }
  }

  /**
   * The budget a request takes when admitted: the buffer it needs (a READ's data, a
   * WRITE's payload), or one piece for one streamed in pieces (a READ: the connection's
   * stream slot, unless it holds it already); and whether it is a streamed READ.
   */
  private costOf(h: Buffer): [number, boolean] {
    const extended = this.mode === MODE_EXTENDED;
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const length = extended
      ? h.readUInt32BE(24) * 2 ** 32 + h.readUInt32BE(28)
      : h.readUInt32BE(24);
    const data =
      type === Command.READ ||
      type === Command.WRITE ||
      (extended && (flags & CommandFlag.PAYLOAD_LEN) !== 0)
        ? length
        : 0;
    if (type === Command.READ && length > STREAM_PIECE) {
      return [this.streamSlot ? 0 : STREAM_PIECE, true];
    }
    return [Math.min(data, STREAM_PIECE), false];
  }

  private request(h: Buffer, cost: number, streamed = false): void {
    const extended = this.mode === MODE_EXTENDED;
    const magic = h.readUInt32BE(0);
    if (magic !== (extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC)) {
      this.account.give(cost);
      if (streamed) this.streamedReadDone();
      this.violation(`bad request magic 0x${magic.toString(16)}`);
      return;
    }
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const offset = h.readUInt32BE(16) * 2 ** 32 + h.readUInt32BE(20);
    const length = extended
      ? h.readUInt32BE(24) * 2 ** 32 + h.readUInt32BE(28)
      : h.readUInt32BE(24);
    if (type === Command.DISC) {
      this.account.give(cost);
      this.disconnectRequested();
      return;
    }
    const payload =
      type === Command.WRITE || (extended && (flags & CommandFlag.PAYLOAD_LEN) !== 0) ? length : 0;
    const req: Request = {
      type,
      flags,
      ids: Buffer.from(h.subarray(8, 24)),
      offset,
      length,
      cost,
      streamed,
    };
    const exp = this.export!;
    this.inFlight++;
    exp.stats.inFlight++;
    exp.stats.requests++;
    let refusal: [number, string] | undefined;
    try {
      refusal = this.validate(req);
    } catch (err) {
      // size() threw: answered as the target failing (after the payload, if any).
      refusal = [wireErrno(err), `the target failed: ${String(err)}`];
    }
    if (payload > 0) {
      if (payload > MAX_PAYLOAD_BYTES) {
        // Never allocated nor skipped: refuse, then hard disconnect.
        this.phase = 'closing';
        this.host.error(
          this,
          badClient(`a ${length}-byte payload (the limit is ${MAX_PAYLOAD_BYTES})`),
        );
        this.replyError(req, WireError.EOVERFLOW, 'payload too large', () => this.destroy());
        return;
      }
      const t = exp.target;
      if (refusal === undefined && payload > STREAM_PIECE) {
        this.streamWrite(req);
        return;
      }
      if (refusal === undefined && t.allocBuffer === undefined && this.q.length >= payload) {
        // A view of the received bytes: no copy, and not ours to recycle.
        this.startWrite(req, this.q.take(payload), false);
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

  /** Why a request is refused ([errno, message]), or undefined if it may run. */
  private validate(req: Request): [number, string] | undefined {
    const exp = this.export!;
    const t = exp.target;
    const { type, flags, offset, length } = req;
    let allowed = CommandFlag.FUA;
    switch (type) {
      case Command.READ:
        if (this.mode !== MODE_SIMPLE) allowed |= CommandFlag.DF;
        break;
      case Command.WRITE:
        if (this.mode === MODE_EXTENDED) allowed |= CommandFlag.PAYLOAD_LEN;
        break;
      case Command.WRITE_ZEROES:
        allowed |= CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO;
        break;
      case Command.BLOCK_STATUS:
        allowed |= CommandFlag.REQ_ONE;
        break;
      case Command.FLUSH:
      case Command.TRIM:
      case Command.CACHE:
        break;
      default:
        return [WireError.EINVAL, `unknown command ${type}`];
    }
    if ((flags & ~allowed) !== 0) {
      return [WireError.EINVAL, `flags 0x${flags.toString(16)} not valid for command ${type}`];
    }
    if (type === Command.FLUSH) return undefined;
    const writeLike =
      type === Command.WRITE || type === Command.TRIM || type === Command.WRITE_ZEROES;
    if (writeLike && !exp.writable) return [WireError.EPERM, 'the export is read-only'];
    if (type === Command.TRIM && !t.trim) return [WireError.EINVAL, 'trim is not supported'];
    if (type === Command.CACHE && !t.cache) return [WireError.EINVAL, 'cache is not supported'];
    if (type === Command.BLOCK_STATUS) {
      if (this.contexts.length === 0) return [WireError.EINVAL, 'no meta context selected'];
      if (length === 0) return [WireError.EINVAL, 'block status of zero bytes'];
    }
    const size = t.size();
    if (offset > size || length > size - offset) {
      const noSpace = type === Command.WRITE || type === Command.WRITE_ZEROES;
      return [
        noSpace ? WireError.ENOSPC : WireError.EINVAL,
        'request beyond the end of the export',
      ];
    }
    if ((type === Command.READ || type === Command.WRITE) && length > exp.blockSize.maximum) {
      return [WireError.EOVERFLOW, `length ${length} exceeds the maximum block size`];
    }
    const min = exp.blockSize.minimum;
    if (min > 1 && type !== Command.BLOCK_STATUS && (offset % min !== 0 || length % min !== 0)) {
      return [WireError.EINVAL, `request not aligned to ${min} bytes`];
    }
    return undefined;
  }

  private execute(req: Request): void {
    const t = this.export!.target;
    switch (req.type) {
      case Command.READ:
        this.doRead(req);
        return;
      case Command.FLUSH:
        this.complete(req, t.flush ? attempt(() => t.flush!()) : undefined);
        return;
      case Command.TRIM:
        this.complete(req, this.trim(req));
        return;
      case Command.WRITE_ZEROES:
        this.complete(req, this.writeZeroes(req));
        return;
      case Command.CACHE:
        this.complete(req, this.cache(req));
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

  private targetFailed(req: Request, err: unknown): void {
    const errno = wireErrno(err);
    const message = err instanceof Error ? err.message : String(err);
    this.host.error(
      this,
      new NbdError(
        'ERR_VMDISK_NBD_TARGET_ERROR',
        `command ${req.type} at ${req.offset} length ${req.length}: ${message}`,
        { cause: err },
      ),
    );
    this.replyError(req, errno, message);
  }

  /** Splits a length-only command at the maximum block size (the target's precondition). */
  private async inPieces(
    req: Request,
    fn: (offset: number, length: number) => Promise<void>,
  ): Promise<void> {
    const max = this.export!.blockSize.maximum;
    let pos = req.offset;
    const end = req.offset + req.length;
    while (pos < end) {
      const n = Math.min(max, end - pos);
      await fn(pos, n);
      pos += n;
    }
  }

  private async fuaFlush(req: Request): Promise<void> {
    const t = this.export!.target;
    if ((req.flags & CommandFlag.FUA) !== 0 && !t.nativeFua && t.flush) await t.flush();
  }

  private async trim(req: Request): Promise<void> {
    const t = this.export!.target;
    const fua = (req.flags & CommandFlag.FUA) !== 0 && t.nativeFua === true;
    await this.inPieces(req, (o, n) => t.trim!(o, n, { fua }));
    await this.fuaFlush(req);
  }

  private async writeZeroes(req: Request): Promise<void> {
    const t = this.export!.target;
    const fua = (req.flags & CommandFlag.FUA) !== 0 && t.nativeFua === true;
    const noHole = (req.flags & CommandFlag.NO_HOLE) !== 0;
    const fastZero = (req.flags & CommandFlag.FAST_ZERO) !== 0;
    if (t.writeZeroes) {
      await this.inPieces(req, (o, n) => t.writeZeroes!(o, n, { fua, noHole, fastZero }));
    } else {
      if (fastZero) throw errnoError('ENOTSUP', 'zeroing would not be fast');
      const zeros = Buffer.alloc(Math.min(req.length, 1024 * 1024, this.export!.blockSize.maximum));
      let pos = req.offset;
      const end = req.offset + req.length;
      while (pos < end) {
        const n = Math.min(zeros.length, end - pos);
        await t.write!(pos, n === zeros.length ? zeros : zeros.subarray(0, n), { fua });
        pos += n;
      }
    }
    this.export!.stats.bytesWritten += req.length;
    await this.fuaFlush(req);
  }

  private async cache(req: Request): Promise<void> {
    const t = this.export!.target;
    await this.inPieces(req, (o, n) => t.cache!(o, n));
  }

  /** Runs a WRITE whose payload is in `buf` (`owned`: from alloc, to be freed). */
  private startWrite(req: Request, buf: Uint8Array, owned: boolean): void {
    const exp = this.export!;
    const t = exp.target;
    if (req.length === 0) {
      if (owned) this.free(buf);
      this.replyOk(req);
      return;
    }
    const fua = (req.flags & CommandFlag.FUA) !== 0;
    const write = attempt(() => t.write!(req.offset, buf, { fua: fua && t.nativeFua === true }));
    const op = fua && !t.nativeFua && t.flush ? write.then(() => t.flush!()) : write;
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
    const exp = this.export!;
    const t = exp.target;
    const fua = (req.flags & CommandFlag.FUA) !== 0;
    const host: WriteStreamHost = {
      target: t,
      account: this.account,
      alloc: (n) => this.alloc(n),
      free: (b) => this.free(b),
      resume: () => {
        if (this.phase === 'transmission') this.pump();
      },
    };
    const done = (outcome: WriteOutcome): void => {
      if (outcome === 'aborted') {
        this.done(req);
      } else if (outcome !== 'written') {
        this.targetFailed(req, outcome.error);
      } else {
        const flushed = fua && !t.nativeFua && t.flush ? attempt(() => t.flush!()) : undefined;
        this.complete(req, flushed, () => {
          exp.stats.bytesWritten += req.length;
        });
      }
    };
    this.writeStream = new WriteStream(
      host,
      req.offset,
      req.length,
      fua && t.nativeFua === true,
      done,
    );
  }

  /** A buffer for request data: the target's (e.g. aligned arena memory) or the pool's. */
  private alloc(length: number): Uint8Array {
    const t = this.export!.target;
    return t.allocBuffer ? t.allocBuffer(length) : this.host.pool.get(length);
  }

  /** Gives back a buffer from alloc once nothing refers to it any more. */
  private free(buf: Uint8Array): void {
    const t = this.export!.target;
    if (t.allocBuffer) t.releaseBuffer?.(buf);
    else this.host.pool.put(buf);
  }

  // ---- READ ----

  private doRead(req: Request): void {
    const exp = this.export!;
    const t = exp.target;
    if (req.length === 0) {
      if (this.mode === MODE_SIMPLE) {
        this.replyOk(req);
        return;
      }
      this.sendChunks(req, [[ChunkType.NONE, EMPTY]]);
      return;
    }
    if (req.length > STREAM_PIECE) {
      this.streamRead(req).catch((err: unknown) => this.targetFailed(req, err));
      return;
    }
    if (this.mode !== MODE_SIMPLE && (req.flags & CommandFlag.DF) === 0 && t.blockStatus) {
      this.sparseRead(req).catch((err: unknown) => this.targetFailed(req, err));
      return;
    }
    this.denseRead(req);
  }

  /** The whole range as one piece of data: one simple reply or one OFFSET_DATA chunk. */
  private denseRead(req: Request): void {
    const exp = this.export!;
    const t = exp.target;
    const headerBytes =
      this.mode === MODE_SIMPLE ? 16 : this.mode === MODE_STRUCTURED ? 20 + 8 : 32 + 8;
    let whole: Buffer | undefined;
    let data: Uint8Array;
    if (t.allocBuffer) {
      try {
        data = t.allocBuffer(req.length);
      } catch (err) {
        this.targetFailed(req, err);
        return;
      }
    } else {
      whole = this.host.pool.get(headerBytes + req.length);
      data = whole.subarray(headerBytes);
    }
    attempt(() => t.read(req.offset, data)).then(
      () => {
        exp.stats.bytesRead += req.length;
        const header = whole ?? Buffer.allocUnsafe(headerBytes);
        if (this.mode === MODE_SIMPLE) {
          this.simpleHeader(header, req, 0);
        } else {
          const at = this.chunkHeader(
            header,
            req,
            REPLY_FLAG_DONE,
            ChunkType.OFFSET_DATA,
            8 + req.length,
          );
          req.ids.copy(header, at, 8, 16);
        }
        const sent = (): void => {
          this.free(whole ?? data);
          this.done(req);
        };
        this.sendQueue.send(whole !== undefined ? [whole] : [header, data], sent);
      },
      (err: unknown) => {
        this.free(whole ?? data);
        this.targetFailed(req, err);
      },
    );
  }

  /**
   * A READ larger than STREAM_PIECE, streamed in pieces (read-stream.ts). Structured
   * without DF: the holes the target reports cheaply go out as OFFSET_HOLE chunks.
   */
  private async streamRead(req: Request): Promise<void> {
    const exp = this.export!;
    const t = exp.target;
    const single = this.mode === MODE_SIMPLE || (req.flags & CommandFlag.DF) !== 0;
    const segments: Segment[] = [];
    if (!single && t.blockStatus) {
      let pos = req.offset;
      for (const e of await this.extents(req.offset, req.length)) {
        const last = segments[segments.length - 1];
        if (last !== undefined && last.zero === e.zero) last.length += e.length;
        else segments.push({ offset: pos, length: e.length, zero: e.zero });
        pos += e.length;
      }
    } else {
      segments.push({ offset: req.offset, length: req.length, zero: false });
    }
    const host: StreamHost = {
      target: t,
      account: this.account,
      sendQueue: this.sendQueue,
      isClosed: () => this.socketClosed,
      alloc: (n) => this.alloc(n),
      free: (b) => this.free(b),
      header: (what) => this.streamHeader(req, what),
      fatal: (err) => {
        this.host.error(
          this,
          new NbdError(
            'ERR_VMDISK_NBD_TARGET_ERROR',
            `read at ${req.offset} length ${req.length} failed after its reply began; disconnecting: ${String(err)}`,
            { cause: err },
          ),
        );
        this.destroy();
      },
      describe: (err) => [wireErrno(err), err instanceof Error ? err.message : String(err)],
    };
    const stream = new ReadStream(host, segments, single, (outcome) =>
      this.streamDone(req, stream, outcome),
    );
    this.streams.push(stream);
    if (this.socketClosed) stream.abort();
    else if (this.streams[0] === stream) stream.start();
  }

  private streamDone(req: Request, stream: ReadStream, outcome: StreamOutcome): void {
    const exp = this.export!;
    const i = this.streams.indexOf(stream);
    if (i >= 0) this.streams.splice(i, 1);
    if (outcome === 'sent') {
      exp.stats.bytesRead += req.length;
      this.done(req);
    } else if (outcome === 'aborted') {
      this.done(req);
    } else if (outcome.answered) {
      exp.stats.errors++;
      this.done(req);
    } else {
      this.targetFailed(req, outcome.error);
    }
    const next = this.streams[0];
    if (i === 0 && next !== undefined && !this.socketClosed) next.start();
  }

  /** The headers of a streamed READ's reply (see StreamHost.header). */
  private streamHeader(req: Request, what: Parameters<StreamHost['header']>[0]): Buffer {
    if ('single' in what) {
      if (this.mode === MODE_SIMPLE) {
        const h = Buffer.allocUnsafe(16);
        this.simpleHeader(h, req, 0);
        return h;
      }
      const h = Buffer.allocUnsafe(this.mode === MODE_EXTENDED ? 40 : 28);
      const at = this.chunkHeader(h, req, REPLY_FLAG_DONE, ChunkType.OFFSET_DATA, 8 + req.length);
      req.ids.copy(h, at, 8, 16);
      return h;
    }
    if ('errno' in what) {
      let msg = Buffer.from(what.message, 'utf8');
      if (msg.length > MAX_STRING_BYTES) msg = msg.subarray(0, MAX_STRING_BYTES);
      const h = Buffer.allocUnsafe((this.mode === MODE_EXTENDED ? 32 : 20) + 6 + msg.length);
      const at = this.chunkHeader(h, req, REPLY_FLAG_DONE, ChunkType.ERROR, 6 + msg.length);
      h.writeUInt32BE(what.errno, at);
      h.writeUInt16BE(msg.length, at + 4);
      msg.copy(h, at + 6);
      return h;
    }
    const flags = what.done ? REPLY_FLAG_DONE : 0;
    const hole = 'hole' in what;
    const body = hole ? 12 : 8;
    const h = Buffer.allocUnsafe((this.mode === MODE_EXTENDED ? 32 : 20) + body);
    const type = hole ? ChunkType.OFFSET_HOLE : ChunkType.OFFSET_DATA;
    const at = this.chunkHeader(h, req, flags, type, hole ? 12 : 8 + what.length);
    writeU64(h, at, what.offset);
    if (hole) h.writeUInt32BE(what.length, at + 8);
    return h;
  }

  /** A structured read that sends zero extents as OFFSET_HOLE chunks. */
  private async sparseRead(req: Request): Promise<void> {
    const exp = this.export!;
    const t = exp.target;
    const extents = await this.extents(req.offset, req.length);
    const segments: Array<{ offset: number; length: number; zero: boolean }> = [];
    let pos = req.offset;
    for (const e of extents) {
      const last = segments[segments.length - 1];
      if (last !== undefined && last.zero === e.zero) last.length += e.length;
      else segments.push({ offset: pos, length: e.length, zero: e.zero });
      pos += e.length;
    }
    const first = segments[0]!;
    if (segments.length === 1 && !first.zero) return this.denseRead(req);
    const buffers: Uint8Array[] = [];
    const reads: Promise<void>[] = [];
    for (const s of segments) {
      if (s.zero) continue;
      const buf = this.alloc(s.length);
      buffers.push(buf);
      reads.push(t.read(s.offset, buf));
    }
    // Every read settled before any buffer goes back.
    const failed = (await Promise.allSettled(reads)).find((r) => r.status === 'rejected');
    if (failed !== undefined) {
      for (const b of buffers) this.free(b);
      throw failed.reason;
    }
    exp.stats.bytesRead += req.length;
    const chunks: Array<[number, Uint8Array, Uint8Array?]> = [];
    let data = 0;
    for (const s of segments) {
      if (s.zero) {
        const body = Buffer.allocUnsafe(12);
        writeU64(body, 0, s.offset);
        body.writeUInt32BE(s.length, 8);
        chunks.push([ChunkType.OFFSET_HOLE, body]);
      } else {
        const prefix = Buffer.allocUnsafe(8);
        writeU64(prefix, 0, s.offset);
        chunks.push([ChunkType.OFFSET_DATA, prefix, buffers[data++]!]);
      }
    }
    this.sendChunks(req, chunks, () => {
      for (const b of buffers) this.free(b);
    });
  }

  /** Extents covering exactly [offset, offset+length), asked of the target in pieces. */
  private async extents(offset: number, length: number): Promise<Extent[]> {
    const t = this.export!.target;
    const max = this.export!.blockSize.maximum;
    const out: Extent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const want = Math.min(max, end - pos);
      // Only holes that are cheap to know are worth skipping in a READ.
      const got = t.blockStatus ? await t.blockStatus(pos, want, { wantZero: false }) : [];
      let covered = 0;
      for (const e of got) {
        const n = Math.min(e.length, want - covered);
        if (!(n > 0)) continue;
        out.push(n === e.length ? e : { ...e, length: n });
        covered += n;
        if (covered >= want) break;
      }
      if (covered === 0) {
        // The target said nothing useful: the rest reads as data.
        out.push({ length: end - pos, hole: false, zero: false });
        break;
      }
      pos += covered;
    }
    return out;
  }

  // ---- BLOCK_STATUS ----

  private async blockStatus(req: Request): Promise<void> {
    const exp = this.export!;
    const t = exp.target;
    const want = Math.min(req.length, exp.blockSize.maximum);
    const reqOne = (req.flags & CommandFlag.REQ_ONE) !== 0;
    let extents: Extent[] = [];
    if (t.blockStatus) {
      let covered = 0;
      for (const e of await t.blockStatus(req.offset, want)) {
        const n = Math.min(e.length, want - covered);
        if (!(n > 0)) continue;
        extents.push(n === e.length ? e : { ...e, length: n });
        covered += n;
        if (covered >= want) break;
      }
    }
    if (extents.length === 0) extents = [{ length: want, hole: false, zero: false }];
    const extended = this.mode === MODE_EXTENDED;
    const chunks: Array<[number, Uint8Array]> = [];
    for (const id of this.contexts) {
      const descs: Array<[number, number]> = [];
      for (const e of extents) {
        const flags =
          id === CTX_BASE_ALLOCATION
            ? (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0)
            : (e.depth ?? (e.hole ? 0 : 1));
        const last = descs[descs.length - 1];
        if (last !== undefined && last[1] === flags) last[0] += e.length;
        else descs.push([e.length, flags]);
        if (reqOne) break;
      }
      if (reqOne && descs.length > 1) descs.length = 1;
      const body = Buffer.alloc(extended ? 8 + 16 * descs.length : 4 + 8 * descs.length);
      body.writeUInt32BE(id, 0);
      if (extended) {
        body.writeUInt32BE(descs.length, 4);
        descs.forEach(([len, flags], i) => {
          writeU64(body, 8 + 16 * i, len);
          writeU64(body, 16 + 16 * i, flags);
        });
      } else {
        descs.forEach(([len, flags], i) => {
          body.writeUInt32BE(len, 4 + 8 * i);
          body.writeUInt32BE(flags >>> 0, 8 + 8 * i);
        });
      }
      chunks.push([extended ? ChunkType.BLOCK_STATUS_EXT : ChunkType.BLOCK_STATUS, body]);
    }
    this.sendChunks(req, chunks);
  }

  // ---- replies ----

  private simpleHeader(buf: Buffer, req: Request, errno: number): void {
    buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    buf.writeUInt32BE(errno, 4);
    req.ids.copy(buf, 8, 0, 8);
  }

  /** Writes a chunk header at the start of `buf`; returns its size. */
  private chunkHeader(
    buf: Buffer,
    req: Request,
    flags: number,
    type: number,
    length: number,
  ): number {
    if (this.mode === MODE_EXTENDED) {
      buf.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
      buf.writeUInt16BE(flags, 4);
      buf.writeUInt16BE(type, 6);
      req.ids.copy(buf, 8, 0, 16);
      writeU64(buf, 24, length);
      return 32;
    }
    buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    buf.writeUInt16BE(flags, 4);
    buf.writeUInt16BE(type, 6);
    req.ids.copy(buf, 8, 0, 8);
    buf.writeUInt32BE(length, 16);
    return 20;
  }

  /** One structured reply: its chunks in order, the last flagged DONE, in one send. */
  private sendChunks(
    req: Request,
    chunks: ReadonlyArray<readonly [number, Uint8Array, Uint8Array?]>,
    sent?: () => void,
  ): void {
    const out: Uint8Array[] = [];
    const headerBytes = this.mode === MODE_EXTENDED ? 32 : 20;
    chunks.forEach(([type, body, data], i) => {
      const header = Buffer.allocUnsafe(headerBytes + body.length);
      const flags = i === chunks.length - 1 ? REPLY_FLAG_DONE : 0;
      const at = this.chunkHeader(header, req, flags, type, body.length + (data?.length ?? 0));
      header.set(body, at);
      out.push(header);
      if (data !== undefined) out.push(data);
    });
    this.sendQueue.send(out, () => {
      sent?.();
      this.done(req);
    });
  }

  private replyOk(req: Request): void {
    if (this.mode === MODE_EXTENDED) {
      this.sendChunks(req, [[ChunkType.NONE, EMPTY]]);
      return;
    }
    const buf = Buffer.allocUnsafe(16);
    this.simpleHeader(buf, req, 0);
    this.sendQueue.send([buf], () => this.done(req));
  }

  private replyError(req: Request, errno: number, message: string, sent?: () => void): void {
    this.export!.stats.errors++;
    if (this.mode === MODE_SIMPLE) {
      const buf = Buffer.allocUnsafe(16);
      this.simpleHeader(buf, req, errno);
      this.sendQueue.send([buf], () => {
        sent?.();
        this.done(req);
      });
      return;
    }
    let msg = Buffer.from(message, 'utf8');
    if (msg.length > MAX_STRING_BYTES) msg = msg.subarray(0, MAX_STRING_BYTES);
    const body = Buffer.allocUnsafe(6 + msg.length);
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(msg.length, 4);
    msg.copy(body, 6);
    this.sendChunks(req, [[ChunkType.ERROR, body]], sent);
  }

  /** A request is over (its reply sent or dropped). */
  private done(req: Request): void {
    this.account.give(req.cost);
    if (req.streamed) this.streamedReadDone();
    this.inFlight--;
    this.export!.stats.inFlight--;
    if (this.phase === 'transmission') {
      if (this.readingPaused || this.q.length > 0) this.pump();
    } else {
      this.maybeFinalize();
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
    this.phase = 'closing';
    this.host.error(this, badClient(message));
    this.destroy();
  }

  /** NBD_CMD_DISC: finish what is in flight, then close; no reply. */
  private disconnectRequested(): void {
    this.phase = 'closing';
    this.q.clear();
    this.maybeFinalize();
  }

  private maybeFinalize(): void {
    if (this.inFlight > 0) return;
    if (!this.socketClosed) {
      if (this.phase === 'closing' && !this.socket.writableEnded) {
        this.socket.end();
        // A client that never closes its side does not keep the connection.
        setTimeout(() => this.destroy(), 5000).unref();
      }
      return;
    }
    if (this.finalized) return;
    this.finalized = true;
    this.host.closed(this);
  }
}

/** Calls a target method; a synchronous throw becomes a rejection. */
function attempt(fn: () => Promise<void>): Promise<void> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}

function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}
