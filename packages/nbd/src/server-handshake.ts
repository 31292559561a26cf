// The server's side of the fixed newstyle handshake: the greeting, then option haggling
// (LIST, STARTTLS, INFO/GO, STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts) until the
// client picks an export (GO or EXPORT_NAME) or aborts. What it agreed on is handed to
// the connection, which starts transmission with it.

import { NbdError } from './errors.ts';
import type { ExportEntry } from './export-entry.ts';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  MAX_STRING_BYTES,
  META_CONTEXT_ALLOCATION_DEPTH,
  META_CONTEXT_BASE_ALLOCATION,
  META_CONTEXT_DIRTY_BITMAP,
  NBDMAGIC,
  Option,
  OptionReply,
  TransmissionFlag,
} from './protocol.ts';
import {
  CTX_ALLOCATION_DEPTH,
  CTX_BASE_ALLOCATION,
  CTX_DIRTY_BITMAP,
  ReplyMode,
  type ReplyModeValue,
} from './server-replies.ts';
import type { ServerTls } from './server-tls.ts';
import { encodeOptionReply } from './wire.ts';

/** Option data beyond this is a hard disconnect (never an allocation). */
export const MAX_OPTION_BYTES = 64 * 1024;

const ZEROES_124 = Buffer.alloc(124);
const EMPTY = Buffer.alloc(0);

/** What the handshake needs from its connection. */
export interface HandshakeIo {
  readonly tls: ServerTls;
  /** The next `n` bytes from the client. */
  read(n: number): Promise<Buffer>;
  write(buf: Buffer): void;
  /** Bytes received and not read yet. */
  readonly queued: number;
  /** Sends `ack` in plain text, then upgrades the socket to TLS. */
  startTls(ack: Buffer): Promise<void>;
  /** The export a client asking for `name` gets ('' is the default export), if any. */
  findExport(name: string): ExportEntry | undefined;
  /** The exports NBD_OPT_LIST shows. */
  listExports(): Iterable<ExportEntry>;
}

/** What the client and the server agreed on. */
export interface Negotiated {
  readonly export: ExportEntry;
  readonly mode: ReplyModeValue;
  /** The meta contexts selected for this export (ids, in order). */
  readonly contexts: number[];
  /** The reply that ends the handshake (GO's ACK, or EXPORT_NAME's export data). */
  readonly reply: Buffer;
}

export const badClient = (message: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_BAD_CLIENT', message);

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

export class Handshake {
  private readonly io: HandshakeIo;
  private mode: ReplyModeValue = ReplyMode.SIMPLE;
  private fixedNewstyle = false;
  private noZeroes = false;
  private tlsActive = false;
  private meta: { exportName: string; ids: number[] } | undefined;

  constructor(io: HandshakeIo) {
    this.io = io;
  }

  /** Runs the handshake; undefined when the client aborted (NBD_OPT_ABORT, answered). */
  async run(): Promise<Negotiated | undefined> {
    const io = this.io;
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    io.write(greeting);

    const clientFlags = (await io.read(4)).readUInt32BE(0);
    if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
      throw badClient(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.fixedNewstyle = (clientFlags & FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    const tlsMode = io.tls.mode;
    if (tlsMode === 'require' && !this.fixedNewstyle) {
      throw badClient('TLS is required and the client does not speak fixed newstyle');
    }

    for (;;) {
      const header = await io.read(16);
      if (header.readBigUInt64BE(0) !== IHAVEOPT) throw badClient('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        throw badClient(`option ${option} claims ${length} bytes of data`);
      }
      const data = length > 0 ? await io.read(length) : EMPTY;
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
        case Option.EXPORT_NAME:
          return this.exportName(data);
        case Option.ABORT:
          this.optReply(option, OptionReply.ACK);
          return undefined;
        case Option.LIST:
          this.list(length);
          break;
        case Option.STARTTLS:
          await this.startTls(length);
          break;
        case Option.INFO:
        case Option.GO: {
          const chosen = this.infoOrGo(option, data);
          if (chosen !== undefined) return chosen;
          break;
        }
        case Option.STRUCTURED_REPLY:
          if (length !== 0) {
            this.optReply(option, OptionReply.ERR_INVALID, 'takes no data');
          } else if (this.mode === ReplyMode.EXTENDED) {
            this.optReply(option, OptionReply.ERR_EXT_HEADER_REQD, 'extended headers in use');
          } else if (this.mode === ReplyMode.STRUCTURED) {
            this.optReply(option, OptionReply.ERR_INVALID, 'already negotiated');
          } else {
            this.mode = ReplyMode.STRUCTURED;
            this.optReply(option, OptionReply.ACK);
          }
          break;
        case Option.EXTENDED_HEADERS:
          if (length !== 0) {
            this.optReply(option, OptionReply.ERR_INVALID, 'takes no data');
          } else if (this.mode === ReplyMode.EXTENDED) {
            this.optReply(option, OptionReply.ERR_INVALID, 'already negotiated');
          } else {
            this.mode = ReplyMode.EXTENDED;
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
    this.io.write(encodeOptionReply(option, type, body));
  }

  private negotiated(exp: ExportEntry, reply: Buffer): Negotiated {
    const contexts =
      this.meta !== undefined && this.meta.exportName === exp.name ? this.meta.ids : [];
    return { export: exp, mode: this.mode, contexts, reply };
  }

  private exportName(data: Buffer): Negotiated {
    // Its reply cannot say anything about extended headers (qemu also hangs up).
    if (this.mode === ReplyMode.EXTENDED) {
      throw badClient('NBD_OPT_EXPORT_NAME after extended headers were negotiated');
    }
    const name = decodeString(data);
    if (name === undefined) throw badClient('NBD_OPT_EXPORT_NAME with a bad name');
    const exp = this.io.findExport(name);
    if (exp === undefined) throw badClient(`NBD_OPT_EXPORT_NAME: no export "${name}"`);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    reply.writeBigUInt64BE(BigInt(exp.target.size()), 0);
    reply.writeUInt16BE(this.transmissionFlags(exp), 8);
    if (!this.noZeroes) ZEROES_124.copy(reply, 10);
    return this.negotiated(exp, reply);
  }

  private list(length: number): void {
    const option = Option.LIST;
    if (length !== 0) {
      this.optReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data');
      return;
    }
    for (const exp of this.io.listExports()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description, 'utf8');
      const body = Buffer.alloc(4 + name.length + desc.length);
      body.writeUInt32BE(name.length, 0);
      name.copy(body, 4);
      desc.copy(body, 4 + name.length);
      this.optReply(option, OptionReply.SERVER, body);
    }
    this.optReply(option, OptionReply.ACK);
  }

  private async startTls(length: number): Promise<void> {
    const option = Option.STARTTLS;
    if (length !== 0) {
      this.optReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      return;
    }
    if (this.io.tls.mode === 'off') {
      this.optReply(option, OptionReply.ERR_POLICY, 'TLS is not enabled on this server');
      return;
    }
    if (this.tlsActive) {
      this.optReply(option, OptionReply.ERR_INVALID, 'TLS is already active');
      return;
    }
    if (this.io.queued > 0) throw badClient('data after NBD_OPT_STARTTLS before its reply');
    await this.io.startTls(encodeOptionReply(option, OptionReply.ACK));
    this.tlsActive = true;
    // Everything negotiated in plain text is forgotten.
    this.mode = ReplyMode.SIMPLE;
    this.meta = undefined;
  }

  /** NBD_OPT_INFO and NBD_OPT_GO; what was agreed when transmission starts. */
  private infoOrGo(option: number, data: Buffer): Negotiated | undefined {
    const invalid = (why: string): undefined => {
      this.optReply(option, OptionReply.ERR_INVALID, why);
      return undefined;
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
    const exp = this.io.findExport(name);
    if (exp === undefined) {
      this.optReply(option, OptionReply.ERR_UNKNOWN, `no export "${name}"`);
      return undefined;
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
      return undefined;
    }
    return this.negotiated(exp, encodeOptionReply(option, OptionReply.ACK));
  }

  private metaContext(option: number, data: Buffer): void {
    const invalid = (why: string): void => this.optReply(option, OptionReply.ERR_INVALID, why);
    if (option === Option.SET_META_CONTEXT && this.mode === ReplyMode.SIMPLE) {
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
    const exp = this.io.findExport(name);
    if (exp === undefined) {
      this.optReply(option, OptionReply.ERR_UNKNOWN, `no export "${name}"`);
      return;
    }
    // QEMU's order: base:allocation, qemu:allocation-depth, then the bitmaps as exported.
    const available: Array<[number, string]> = [
      [CTX_BASE_ALLOCATION, META_CONTEXT_BASE_ALLOCATION],
    ];
    if (exp.target.features.depth) {
      available.push([CTX_ALLOCATION_DEPTH, META_CONTEXT_ALLOCATION_DEPTH]);
    }
    exp.target.features.dirtyBitmaps.forEach((n, i) => {
      available.push([CTX_DIRTY_BITMAP + i, `${META_CONTEXT_DIRTY_BITMAP}${n}`]);
    });
    const list = option === Option.LIST_META_CONTEXT;
    // Listing: everything when there is no query; a query ending in ':' (a namespace,
    // 'qemu:' or 'qemu:dirty-bitmap:') lists every context under it, as QEMU answers.
    // Selecting: exact names only, the first of a name exported twice (as QEMU).
    const chosen = available.filter(([, n], i) =>
      list
        ? queries.length === 0 ||
          queries.some((q) => n === q || (q.endsWith(':') && n.startsWith(q)))
        : queries.includes(n) && available.findIndex(([, m]) => m === n) === i,
    );
    for (const [id, n] of chosen) {
      const nb = Buffer.from(n, 'utf8');
      const body = Buffer.alloc(4 + nb.length);
      body.writeUInt32BE(list ? 0 : id, 0);
      nb.copy(body, 4);
      this.optReply(option, OptionReply.META_CONTEXT, body);
    }
    if (!list) this.meta = { exportName: exp.name, ids: chosen.map(([id]) => id) };
    this.optReply(option, OptionReply.ACK);
  }

  private transmissionFlags(exp: ExportEntry): number {
    const can = exp.target.features;
    let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
    if (!exp.writable) {
      flags |= TransmissionFlag.READ_ONLY;
    } else {
      flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES;
      if (can.trim) flags |= TransmissionFlag.SEND_TRIM;
      if (can.fastZero) flags |= TransmissionFlag.SEND_FAST_ZERO;
    }
    if (this.mode !== ReplyMode.SIMPLE) flags |= TransmissionFlag.SEND_DF;
    if (can.cache) flags |= TransmissionFlag.SEND_CACHE;
    if (exp.multiConn && (can.multiConnSafe || !exp.writable)) {
      flags |= TransmissionFlag.CAN_MULTI_CONN;
    }
    return flags;
  }
}
