// The client side of the NBD handshake: fixed newstyle with STARTTLS, EXTENDED_HEADERS or
// STRUCTURED_REPLY, SET_META_CONTEXT and GO (falling back to EXPORT_NAME on servers
// without GO, and to plain newstyle or oldstyle servers). Every length the server sends
// is checked against a fixed bound before anything is read or allocated.

import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { buildTlsConnectOptions, type NbdClientTlsOptions, upgradeToTls } from './client-tls.ts';
import { NbdConnectionError, NbdError, NbdOptionError } from './errors.ts';
import type { BlockSizeConstraints } from './export-target.ts';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  isOptionReplyError,
  MAX_STRING_BYTES,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  TransmissionFlag,
} from './protocol.ts';
import type { ReadRouter } from './read-router.ts';
import { encodeOption } from './wire.ts';

/** The oldstyle handshake's second magic (cliserv_magic). */
const OLDSTYLE_MAGIC = 0x00420281861253n;
/** The largest option reply we accept (a LIST reply carries a name and a description). */
const MAX_OPTION_REPLY_BYTES = 4 + 2 * MAX_STRING_BYTES + 64;

export const protocolError = (message: string): NbdConnectionError =>
  new NbdConnectionError('ERR_VMDISK_NBD_PROTOCOL_ERROR', `NBD protocol error: ${message}`);

const optionName = (code: number): string =>
  Object.entries(Option).find(([, v]) => v === code)?.[0] ?? String(code);
const replyName = (code: number): string =>
  Object.entries(OptionReply).find(([, v]) => v === code)?.[0] ?? `0x${code.toString(16)}`;

/** Reads exact byte counts from a socket during negotiation. */
export class SocketReader {
  private chunks: Buffer[] = [];
  private available = 0;
  private waiter:
    | { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  private failure: Error | undefined;
  private socket: Socket | undefined;
  private router: ReadRouter | undefined;

  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.available += chunk.length;
    this.pump();
  };
  private readonly onEnd = () => {
    this.fail(
      new NbdConnectionError(
        'ERR_VMDISK_NBD_CONNECTION_LOST',
        'the NBD server closed the connection during negotiation',
      ),
    );
  };
  private readonly onError = (err: Error) => {
    this.fail(
      new NbdConnectionError(
        'ERR_VMDISK_NBD_CONNECTION_LOST',
        `the connection to the NBD server failed during negotiation: ${err.message}`,
        err,
      ),
    );
  };

  /** Reads through a ReadRouter (a socket made with `onread`) as well as 'data' events. */
  attachRouter(router: ReadRouter): void {
    this.router = router;
    router.setSink({ bytes: (view) => this.onData(Buffer.from(view)) });
  }

  attach(socket: Socket): void {
    this.socket = socket;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
    socket.resume();
  }

  /** Stops reading; returns whatever arrived and was not consumed. */
  detach(): Buffer {
    const s = this.socket;
    if (s) {
      s.pause();
      s.off('data', this.onData);
      s.off('end', this.onEnd);
      s.off('close', this.onEnd);
      s.off('error', this.onError);
    }
    this.socket = undefined;
    this.router?.setSink(undefined);
    this.router = undefined;
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.available = 0;
    return rest;
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }

  read(n: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('SocketReader: concurrent reads'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.pump();
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (!w || this.available < w.n) return;
    this.waiter = undefined;
    const out = Buffer.allocUnsafe(w.n);
    let filled = 0;
    while (filled < w.n) {
      const head = this.chunks[0]!;
      const take = Math.min(head.length, w.n - filled);
      head.copy(out, filled, 0, take);
      filled += take;
      if (take === head.length) this.chunks.shift();
      else this.chunks[0] = head.subarray(take);
    }
    this.available -= w.n;
    w.resolve(out);
  }
}

export interface NegotiateOptions {
  exportName: string;
  tls?: NbdClientTlsOptions;
  /** The host connected to (for the certificate check); undefined for unix sockets. */
  host?: string;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  metaContexts: string[];
  /** List the exports (NBD_OPT_LIST) and end the session instead of entering one. */
  list?: boolean;
  /** The socket was made with this router's `onread` (plain connections only). */
  router?: ReadRouter;
  /** Aborts the handshake: its reason is the error negotiate() rejects with. */
  signal?: AbortSignal;
}

export interface Negotiated {
  socket: Socket | TLSSocket;
  tls: boolean;
  size: number;
  flags: number;
  blockSize?: BlockSizeConstraints;
  description?: string;
  /** The export's canonical name if the server sent NBD_INFO_NAME. */
  name?: string;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  /** Selected meta contexts: id -> name. */
  contexts: Map<number, string>;
  /** 'fixed-newstyle', 'newstyle' or 'oldstyle'. */
  handshake: 'fixed-newstyle' | 'newstyle' | 'oldstyle';
  /** Bytes that arrived after negotiation (the transmission parser takes them). */
  leftover: Buffer;
  /** With `list`: the server's exports. */
  exports?: NbdExportListing[];
}

/** One export as NBD_OPT_LIST names it. */
export interface NbdExportListing {
  name: string;
  description: string;
}

interface OptionReplyMsg {
  type: number;
  data: Buffer;
}

const encodeString = (s: string, what: string): Buffer => {
  const b = Buffer.from(s, 'utf8');
  if (b.length > MAX_STRING_BYTES) {
    throw new NbdError(
      'ERR_VMDISK_NBD_INVALID_REQUEST',
      `the ${what} is longer than ${MAX_STRING_BYTES} bytes`,
    );
  }
  if (b.includes(0)) {
    throw new NbdError('ERR_VMDISK_NBD_INVALID_REQUEST', `the ${what} contains NUL`);
  }
  return b;
};

const checkSize = (size: bigint): number => {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw protocolError(`export size ${size} is beyond 2^53`);
  }
  return Number(size);
};

const isPowerOf2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

/** Runs the whole handshake on a connected socket. */
export async function negotiate(socket: Socket, opts: NegotiateOptions): Promise<Negotiated> {
  const reader = new SocketReader();
  reader.attach(socket);
  if (opts.router) reader.attachRouter(opts.router);
  let current: Socket | TLSSocket = socket;
  /** In fixed-newstyle option haggling, where the way out is NBD_OPT_ABORT. */
  let haggling = false;
  const onAbort = () => {
    reader.fail(opts.signal?.reason as Error);
    current.destroy();
  };
  if (opts.signal?.aborted) onAbort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  /** The outcome of a handshake without options (oldstyle, or newstyle not fixed). */
  const plain = (handshake: 'oldstyle' | 'newstyle', size: number, flags: number): Negotiated => ({
    socket: current,
    tls: false,
    size,
    flags,
    structuredReplies: false,
    extendedHeaders: false,
    contexts: new Map(),
    handshake,
    leftover: reader.detach(),
  });
  try {
    const nameBytes = encodeString(opts.exportName, 'export name');
    const contextQueries = opts.metaContexts.map((c) => encodeString(c, 'meta context name'));

    const hello = await reader.read(16);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC) {
      throw protocolError('the server did not greet with NBDMAGIC (is this an NBD server?)');
    }
    const magic2 = hello.readBigUInt64BE(8);
    if (magic2 === OLDSTYLE_MAGIC) {
      if (opts.list) {
        throw new NbdError(
          'ERR_VMDISK_NBD_UNSUPPORTED',
          'the server speaks oldstyle NBD, which cannot list exports',
        );
      }
      if (opts.tls && opts.tls.mode !== 'prefer') {
        throw new NbdConnectionError(
          'ERR_VMDISK_NBD_TLS_FAILED',
          'the server speaks oldstyle NBD, which has no TLS',
        );
      }
      const rest = await reader.read(8 + 4 + 124);
      const size = checkSize(rest.readBigUInt64BE(0));
      const flags = rest.readUInt32BE(8) & 0xffff;
      return plain('oldstyle', size, flags);
    }
    if (magic2 !== IHAVEOPT) throw protocolError('unknown handshake magic after NBDMAGIC');
    const hsFlags = (await reader.read(2)).readUInt16BE(0);
    const fixed = (hsFlags & FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (hsFlags & FLAG_NO_ZEROES) !== 0;
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(
      (fixed ? FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? FLAG_C_NO_ZEROES : 0),
    );
    current.write(clientFlags);
    haggling = fixed;

    const sendOption = (option: number, data?: Buffer) => {
      current.write(encodeOption(option, data));
    };

    const exportName = async (): Promise<{ size: number; flags: number }> => {
      sendOption(Option.EXPORT_NAME, nameBytes);
      haggling = false;
      let reply: Buffer;
      try {
        reply = await reader.read(noZeroes ? 10 : 134);
      } catch (err) {
        if (err instanceof NbdError && err.code === 'ERR_VMDISK_NBD_CONNECTION_LOST') {
          throw new NbdConnectionError(
            'ERR_VMDISK_NBD_CONNECTION_LOST',
            `the NBD server closed the connection after NBD_OPT_EXPORT_NAME: ` +
              `it has no export '${opts.exportName}' or refused it`,
            err,
          );
        }
        throw err;
      }
      return { size: checkSize(reply.readBigUInt64BE(0)), flags: reply.readUInt16BE(8) };
    };

    if (!fixed && opts.list) {
      throw new NbdError(
        'ERR_VMDISK_NBD_UNSUPPORTED',
        'the server does not speak fixed newstyle NBD, so it cannot list its exports',
      );
    }
    if (!fixed) {
      if (opts.tls && opts.tls.mode !== 'prefer') {
        throw new NbdConnectionError(
          'ERR_VMDISK_NBD_TLS_FAILED',
          'the server does not speak fixed newstyle NBD, so it cannot do TLS',
        );
      }
      const { size, flags } = await exportName();
      return plain('newstyle', size, flags);
    }

    let inTls = false;
    const readReply = async (option: number): Promise<OptionReplyMsg> => {
      const h = await reader.read(20);
      if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC)
        throw protocolError('bad option reply magic');
      const echoed = h.readUInt32BE(8);
      if (echoed !== option) {
        throw protocolError(
          `reply to option ${optionName(echoed)} while ${optionName(option)} was asked`,
        );
      }
      const type = h.readUInt32BE(12);
      const len = h.readUInt32BE(16);
      if (len > MAX_OPTION_REPLY_BYTES) {
        throw protocolError(`an option reply of ${len} bytes (at most ${MAX_OPTION_REPLY_BYTES})`);
      }
      const data = len ? await reader.read(len) : Buffer.alloc(0);
      if (isOptionReplyError(type) && type === OptionReply.ERR_TLS_REQD && !inTls) {
        throw new NbdConnectionError(
          'ERR_VMDISK_NBD_TLS_REQUIRED',
          'the NBD server requires TLS: give TLS credentials or use an nbds:// URI',
        );
      }
      if (isOptionReplyError(type) && type === OptionReply.ERR_SHUTDOWN) {
        throw new NbdOptionError(optionName(option), replyName(type), data.toString('utf8'));
      }
      return { type, data };
    };
    const refused = (option: number, r: OptionReplyMsg) =>
      new NbdOptionError(optionName(option), replyName(r.type), r.data.toString('utf8'));
    const expectAckOnly = async (option: number): Promise<OptionReplyMsg> => {
      const r = await readReply(option);
      if (r.type === OptionReply.ACK || isOptionReplyError(r.type)) return r;
      throw protocolError(`unexpected reply ${replyName(r.type)} to ${optionName(option)}`);
    };

    // STARTTLS first, so that everything after it is private.
    if (opts.tls) {
      const tlsConnect = await buildTlsConnectOptions(opts.tls, opts.host);
      sendOption(Option.STARTTLS);
      const r = await expectAckOnly(Option.STARTTLS);
      if (r.type === OptionReply.ACK) {
        const rest = reader.detach();
        if (rest.length) throw protocolError('the server sent data after its STARTTLS reply');
        haggling = false; // a failed TLS handshake leaves nothing to say ABORT on
        current = await upgradeToTls(socket, tlsConnect);
        haggling = true;
        inTls = true;
        reader.attach(current);
      } else if (opts.tls.mode !== 'prefer') {
        throw new NbdConnectionError(
          'ERR_VMDISK_NBD_TLS_FAILED',
          `the NBD server refused STARTTLS (${replyName(r.type)})` +
            (r.data.length ? `: ${r.data.toString('utf8')}` : ''),
        );
      }
    }

    if (opts.list) {
      sendOption(Option.LIST);
      const exports: NbdExportListing[] = [];
      for (;;) {
        const r = await readReply(Option.LIST);
        if (r.type === OptionReply.SERVER) {
          if (r.data.length < 4) throw protocolError('a SERVER reply without a name length');
          const len = r.data.readUInt32BE(0);
          if (len > r.data.length - 4) throw protocolError('a SERVER reply whose name overruns it');
          exports.push({
            name: r.data.toString('utf8', 4, 4 + len),
            description: r.data.toString('utf8', 4 + len),
          });
          continue;
        }
        if (r.type === OptionReply.ACK) break;
        if (isOptionReplyError(r.type)) throw refused(Option.LIST, r);
        throw protocolError(`unexpected reply ${replyName(r.type)} to LIST`);
      }
      // A soft disconnect: ABORT, its ACK if the server sends one, then close.
      sendOption(Option.ABORT);
      await reader.read(20).catch(() => undefined);
      reader.detach();
      current.end();
      return {
        socket: current,
        tls: inTls,
        size: 0,
        flags: 0,
        structuredReplies: false,
        extendedHeaders: false,
        contexts: new Map(),
        handshake: 'fixed-newstyle',
        leftover: Buffer.alloc(0),
        exports,
      };
    }

    let extended = false;
    let structured = false;
    if (opts.extendedHeaders) {
      sendOption(Option.EXTENDED_HEADERS);
      const r = await expectAckOnly(Option.EXTENDED_HEADERS);
      extended = r.type === OptionReply.ACK;
    }
    if (!extended && opts.structuredReplies) {
      sendOption(Option.STRUCTURED_REPLY);
      const r = await expectAckOnly(Option.STRUCTURED_REPLY);
      structured = r.type === OptionReply.ACK;
    }

    const contexts = new Map<number, string>();
    if ((structured || extended) && contextQueries.length > 0) {
      const parts: Buffer[] = [];
      const head = Buffer.allocUnsafe(4);
      head.writeUInt32BE(nameBytes.length);
      parts.push(head, nameBytes);
      const count = Buffer.allocUnsafe(4);
      count.writeUInt32BE(contextQueries.length);
      parts.push(count);
      for (const q of contextQueries) {
        const l = Buffer.allocUnsafe(4);
        l.writeUInt32BE(q.length);
        parts.push(l, q);
      }
      sendOption(Option.SET_META_CONTEXT, Buffer.concat(parts));
      const selected = new Map<number, string>();
      for (;;) {
        const r = await readReply(Option.SET_META_CONTEXT);
        if (r.type === OptionReply.META_CONTEXT) {
          if (r.data.length < 5) throw protocolError('a META_CONTEXT reply without a name');
          const id = r.data.readUInt32BE(0);
          const name = r.data.subarray(4).toString('utf8');
          if (selected.has(id)) throw protocolError(`meta context id ${id} given twice`);
          selected.set(id, name);
          continue;
        }
        if (r.type === OptionReply.ACK) {
          for (const [id, name] of selected) contexts.set(id, name);
        } else if (!isOptionReplyError(r.type)) {
          throw protocolError(`unexpected reply ${replyName(r.type)} to SET_META_CONTEXT`);
        }
        // An error: no contexts; block status is then unavailable.
        break;
      }
    }

    // GO: export, name, description and block size constraints.
    const infos = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE];
    const go = Buffer.allocUnsafe(4 + nameBytes.length + 2 + 2 * infos.length);
    go.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(go, 4);
    go.writeUInt16BE(infos.length, 4 + nameBytes.length);
    infos.forEach((t, i) => {
      go.writeUInt16BE(t, 6 + nameBytes.length + 2 * i);
    });
    sendOption(Option.GO, go);
    let size: number | undefined;
    let flags = 0;
    let blockSize: BlockSizeConstraints | undefined;
    let description: string | undefined;
    let name: string | undefined;
    for (;;) {
      const r = await readReply(Option.GO);
      if (r.type === OptionReply.INFO) {
        if (r.data.length < 2) throw protocolError('an INFO reply without its type');
        const info = r.data.readUInt16BE(0);
        const body = r.data.subarray(2);
        switch (info) {
          case Info.EXPORT:
            if (body.length !== 10) throw protocolError('NBD_INFO_EXPORT of the wrong length');
            size = checkSize(body.readBigUInt64BE(0));
            flags = body.readUInt16BE(8);
            break;
          case Info.NAME:
            name = body.toString('utf8');
            break;
          case Info.DESCRIPTION:
            description = body.toString('utf8');
            break;
          case Info.BLOCK_SIZE: {
            if (body.length !== 12) throw protocolError('NBD_INFO_BLOCK_SIZE of the wrong length');
            const minimum = body.readUInt32BE(0);
            const preferred = body.readUInt32BE(4);
            const maximum = body.readUInt32BE(8);
            if (!isPowerOf2(minimum) || !isPowerOf2(preferred) || maximum < minimum) {
              throw protocolError(`bad block size constraints ${minimum}/${preferred}/${maximum}`);
            }
            blockSize = { minimum, preferred, maximum };
            break;
          }
          default:
            break; // unknown information: ignored, as the spec says
        }
        continue;
      }
      if (r.type === OptionReply.ACK) {
        if (size === undefined) throw protocolError('GO acknowledged without NBD_INFO_EXPORT');
        break;
      }
      if (r.type === OptionReply.ERR_UNSUP && !extended) {
        // An old server without GO: EXPORT_NAME (structured replies stay negotiated).
        const got = await exportName();
        size = got.size;
        flags = got.flags;
        break;
      }
      if (isOptionReplyError(r.type)) throw refused(Option.GO, r);
      throw protocolError(`unexpected reply ${replyName(r.type)} to GO`);
    }
    if ((flags & TransmissionFlag.HAS_FLAGS) === 0) flags = 0;
    const out: Negotiated = {
      socket: current,
      tls: inTls,
      size,
      flags,
      structuredReplies: structured || extended,
      extendedHeaders: extended,
      contexts,
      handshake: 'fixed-newstyle',
      leftover: reader.detach(),
    };
    if (blockSize) out.blockSize = blockSize;
    if (description !== undefined) out.description = description;
    if (name !== undefined) out.name = name;
    return out;
  } catch (err) {
    reader.detach();
    const refusal =
      err instanceof NbdOptionError ||
      (err instanceof NbdError &&
        (err.code === 'ERR_VMDISK_NBD_TLS_REQUIRED' || err.code === 'ERR_VMDISK_NBD_TLS_FAILED'));
    if (haggling && refusal && !opts.signal?.aborted && current.writable) {
      // A refusal ends option haggling with a soft disconnect: NBD_OPT_ABORT, then close.
      const abort = encodeOption(Option.ABORT);
      const sock = current;
      const done = () => {
        sock.destroy();
        socket.destroy();
      };
      sock.once('error', done);
      sock.end(abort, done);
      setTimeout(done, 1000).unref();
    } else {
      current.destroy();
      socket.destroy();
    }
    // A timeout or abort may surface as some other failure (e.g. of the TLS handshake).
    if (opts.signal?.aborted) throw opts.signal.reason;
    throw err;
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
}
