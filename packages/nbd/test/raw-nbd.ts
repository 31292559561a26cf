// A raw-socket NBD client for the server's tests: it speaks the protocol byte by byte, so
// that tests can send exactly what a broken or hostile client would. It shares no code
// with the package (only the numbers of src/protocol.ts).

import * as net from 'node:net';
import {
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../src/protocol.ts';

export interface OptionReplyMsg {
  option: number;
  type: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  offset?: bigint;
  payload: Buffer;
}

export class RawNbd {
  readonly socket: net.Socket;
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  private ended = false;
  readonly closed: Promise<void>;
  extended = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.waiter?.();
    });
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.ended = true;
        this.waiter?.();
        resolve();
      });
    });
    socket.on('error', () => {});
  }

  /** Over an already connected socket (e.g. a TLS socket after STARTTLS). */
  static fromSocket(socket: net.Socket): RawNbd {
    return new RawNbd(socket);
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host }, () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  static connectPath(path: string): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ path }, () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  /** Exactly n bytes; rejects if the connection closes first. */
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed (wanted ${n}, had ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
      this.waiter = undefined;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Uint8Array): void {
    this.socket.write(b);
  }

  /** Resolves true if the server closes the connection within `ms`. */
  async closedWithin(ms = 3000): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    });
    const r = await Promise.race([this.closed.then(() => true), t]);
    clearTimeout(timer);
    return r;
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Reads the greeting and answers with `clientFlags`; returns the handshake flags. */
  async handshake(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new Error('bad greeting');
    }
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags >>> 0);
    this.write(f);
    return g.readUInt16BE(16);
  }

  sendOption(option: number, data: Uint8Array = Buffer.alloc(0), lengthOverride?: number): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option >>> 0, 8);
    h.writeUInt32BE((lengthOverride ?? data.length) >>> 0, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<OptionReplyMsg> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** All replies to one option, up to and including the final one. */
  async optionReplies(): Promise<OptionReplyMsg[]> {
    const out: OptionReplyMsg[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === OptionReply.ACK || (r.type & 0x80000000) !== 0) return out;
    }
  }

  async simpleOption(option: number, data?: Uint8Array): Promise<number> {
    this.sendOption(option, data);
    const replies = await this.optionReplies();
    return replies[replies.length - 1]!.type;
  }

  static goData(name: string, infos: number[] = []): Buffer {
    const n = Buffer.from(name);
    const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    b.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((t, i) => {
      b.writeUInt16BE(t, 6 + n.length + 2 * i);
    });
    return b;
  }

  static metaData(name: string, queries: string[]): Buffer {
    const parts: Buffer[] = [];
    const n = Buffer.from(name);
    const h = Buffer.alloc(4);
    h.writeUInt32BE(n.length);
    parts.push(h, n);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(queries.length);
    parts.push(c);
    for (const q of queries) {
      const qb = Buffer.from(q);
      const l = Buffer.alloc(4);
      l.writeUInt32BE(qb.length);
      parts.push(l, qb);
    }
    return Buffer.concat(parts);
  }

  /** GO; returns the replies (INFO items then ACK, or an error). */
  async go(name: string, infos: number[] = []): Promise<OptionReplyMsg[]> {
    this.sendOption(Option.GO, RawNbd.goData(name, infos));
    return this.optionReplies();
  }

  /** Handshake, optional structured replies / extended headers / meta contexts, GO. */
  static async open(
    port: number,
    name: string,
    opts: { structured?: boolean; extended?: boolean; meta?: string[] } = {},
  ): Promise<{ nbd: RawNbd; size: bigint; flags: number; contexts: Map<string, number> }> {
    const nbd = await RawNbd.connect(port);
    await nbd.handshake();
    if (opts.extended) {
      if ((await nbd.simpleOption(Option.EXTENDED_HEADERS)) !== OptionReply.ACK) {
        throw new Error('extended headers refused');
      }
      nbd.extended = true;
    } else if (opts.structured) {
      if ((await nbd.simpleOption(Option.STRUCTURED_REPLY)) !== OptionReply.ACK) {
        throw new Error('structured replies refused');
      }
    }
    const contexts = new Map<string, number>();
    if (opts.meta) {
      nbd.sendOption(Option.SET_META_CONTEXT, RawNbd.metaData(name, opts.meta));
      for (const r of await nbd.optionReplies()) {
        if (r.type === OptionReply.META_CONTEXT) {
          contexts.set(r.data.subarray(4).toString(), r.data.readUInt32BE(0));
        }
      }
    }
    const replies = await nbd.go(name);
    const last = replies[replies.length - 1]!;
    if (last.type !== OptionReply.ACK) throw new Error(`GO failed: 0x${last.type.toString(16)}`);
    const info = replies.find((r) => r.type === OptionReply.INFO && r.data.readUInt16BE(0) === 0)!;
    return {
      nbd,
      size: info.data.readBigUInt64BE(2),
      flags: info.data.readUInt16BE(10),
      contexts,
    };
  }

  request(r: {
    type: number;
    flags?: number;
    cookie: bigint;
    offset?: bigint;
    length: bigint | number;
    payload?: Uint8Array;
    magic?: number;
  }): void {
    const ext = this.extended;
    const h = Buffer.alloc(ext ? 32 : 28);
    h.writeUInt32BE(r.magic ?? (ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC), 0);
    h.writeUInt16BE(r.flags ?? 0, 4);
    h.writeUInt16BE(r.type, 6);
    h.writeBigUInt64BE(r.cookie, 8);
    h.writeBigUInt64BE(r.offset ?? 0n, 16);
    if (ext) h.writeBigUInt64BE(BigInt(r.length), 24);
    else h.writeUInt32BE(Number(r.length) >>> 0, 24);
    this.write(r.payload ? Buffer.concat([h, r.payload]) : h);
  }

  /** A simple reply without data. */
  async simpleReply(): Promise<{ error: number; cookie: bigint }> {
    const h = await this.read(16);
    if (h.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
      throw new Error(`expected a simple reply, got magic 0x${h.readUInt32BE(0).toString(16)}`);
    }
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  /** One reply message: a structured/extended chunk, or a simple reply (as type -1). */
  async message(): Promise<Chunk & { error?: number }> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      return {
        flags: 1,
        type: -1,
        cookie: rest.readBigUInt64BE(4),
        payload: Buffer.alloc(0),
        error: rest.readUInt32BE(0),
      };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const h = await this.read(16);
      const len = h.readUInt32BE(12);
      return {
        flags: h.readUInt16BE(0),
        type: h.readUInt16BE(2),
        cookie: h.readBigUInt64BE(4),
        payload: await this.read(len),
      };
    }
    if (magic === EXTENDED_REPLY_MAGIC) {
      const h = await this.read(28);
      const len = Number(h.readBigUInt64BE(20));
      return {
        flags: h.readUInt16BE(0),
        type: h.readUInt16BE(2),
        cookie: h.readBigUInt64BE(4),
        offset: h.readBigUInt64BE(12),
        payload: await this.read(len),
      };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** Every message of one reply (until DONE), for a client with one request in flight. */
  async reply(): Promise<Array<Chunk & { error?: number }>> {
    const out: Array<Chunk & { error?: number }> = [];
    for (;;) {
      const m = await this.message();
      out.push(m);
      if (m.type === -1 || (m.flags & 1) !== 0) return out;
    }
  }
}

/** The NBD error of a reply (simple or structured ERROR chunk), 0 for success. */
export function replyError(msgs: ReadonlyArray<Chunk & { error?: number }>): number {
  for (const m of msgs) {
    if (m.type === -1) return m.error ?? 0;
    if ((m.type & 0x8000) !== 0) return m.payload.readUInt32BE(0);
  }
  return 0;
}
