// The NBD client: connects over TCP or a unix socket (optionally TLS, client-connect.ts),
// negotiates the export (client-negotiation.ts) and then keeps any number of requests in
// flight, each matched to its reply by cookie (client-replies.ts parses the replies).
//
// A request's promise settles with the server's answer: a server error rejects it with an
// NbdCommandError (code ERR_VMDISK_NBD_COMMAND_FAILED, errnoName 'EIO' etc.); a broken
// connection or a protocol violation by the server rejects every pending request at once
// and ends the connection. Buffers handed to write() must stay untouched until the
// promise settles (they are sent without a copy); read() fills the caller's buffer.

import type * as net from 'node:net';
import type { TLSSocket } from 'node:tls';
import { type NbdClientOptions, type NbdConnectTarget, openConnection } from './client-connect.ts';
import type { NbdExportListing, Negotiated } from './client-negotiation.ts';
import { type BlockStatusResult, type PendingRequest, ReplyParser } from './client-replies.ts';
import { NbdCommandError, NbdConnectionError, NbdError } from './errors.ts';
import type { BlockSizeConstraints } from './export-target.ts';
import { Command, CommandFlag, MAX_PAYLOAD_BYTES, TransmissionFlag } from './protocol.ts';
import type { ReadRouter } from './read-router.ts';
import { encodeRequestHeader } from './wire.ts';

export type { NbdClientOptions, NbdConnectTarget } from './client-connect.ts';
export type { NbdExportListing } from './client-negotiation.ts';
export type { BlockStatusResult, NbdExtent } from './client-replies.ts';
export type { NbdClientTlsOptions } from './client-tls.ts';

export interface NbdWriteOptions {
  /** Force Unit Access: durable when the reply comes (needs canFua). */
  fua?: boolean;
}

export interface NbdWriteZeroesOptions extends NbdWriteOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than write zeros slowly (needs canFastZero). */
  fastZero?: boolean;
}

export interface NbdBlockStatusOptions {
  /** Ask for one extent per context (NBD_CMD_FLAG_REQ_ONE). */
  reqOne?: boolean;
}

const COMMAND_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Command).map(([k, v]) => [v, k]),
);

const invalidRequest = (message: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_INVALID_REQUEST', message);
const unsupported = (what: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_UNSUPPORTED', `the NBD export does not support ${what}`);

/**
 * Waits for every part of a split request, then fails with the first error: when the
 * caller's promise settles, nothing is still reading from or writing into its buffer.
 */
async function settleAll(parts: Promise<unknown>[]): Promise<void> {
  if (parts.length === 1) {
    await parts[0];
    return;
  }
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** How long close() waits for the server to hang up after NBD_CMD_DISC. */
const DISC_LINGER_MS = 5000;

/** Effect lengths of TRIM, WRITE_ZEROES and CACHE are split at this with compact headers. */
const COMPACT_SPLIT = 2 ** 31;

export class NbdClient {
  /** The export's size in bytes. */
  readonly size: number;
  /** The transmission flags (TransmissionFlag bits). */
  readonly flags: number;
  readonly exportName: string;
  /** The export's description (NBD_INFO_DESCRIPTION), if the server gave one. */
  readonly description: string | undefined;
  /** The server's block size constraints, if it sent them (requests must obey them). */
  readonly blockSize: BlockSizeConstraints | undefined;
  readonly structuredReplies: boolean;
  readonly extendedHeaders: boolean;
  readonly tls: boolean;
  readonly handshake: 'fixed-newstyle' | 'newstyle' | 'oldstyle';
  /** The meta contexts the server selected, e.g. ['base:allocation']. */
  readonly metaContexts: readonly string[];
  /** Settles when the connection is gone: undefined after close(), else the error. */
  readonly closed: Promise<NbdError | undefined>;

  private readonly socket: net.Socket | TLSSocket;
  private readonly rawSocket: net.Socket;
  private readonly pending = new Map<number, PendingRequest>();
  /** Requests beyond maxInFlight, sent in order as replies come. */
  private waiting: { send(): void; reject(err: Error): void }[] = [];
  private readonly maxInFlight: number;
  private nextCookie = 1;
  private corked = false;
  private broken: NbdError | undefined;
  private closing = false;
  private discSent = false;
  private closePromise: Promise<void> | undefined;
  private drainWaiters: (() => void)[] = [];
  private lastSocketError: Error | undefined;
  private resolveClosed!: (err: NbdError | undefined) => void;
  private readonly maxIo: number;
  private readonly align: number;

  /** Connects, negotiates and resolves with a client in the transmission phase. */
  static async connect(
    target: NbdConnectTarget,
    options: NbdClientOptions = {},
  ): Promise<NbdClient> {
    const maxInFlight = options.maxInFlight ?? Number.POSITIVE_INFINITY;
    if (!(maxInFlight >= 1)) throw invalidRequest(`maxInFlight ${maxInFlight}: at least 1`);
    const { socket, negotiated, exportName, router } = await openConnection(target, options, false);
    return new NbdClient(socket, negotiated, exportName, maxInFlight, router);
  }

  /**
   * Lists the server's exports (NBD_OPT_LIST, over TLS when configured) and disconnects.
   * Servers may list only some exports, or refuse (NbdOptionError with ERR_POLICY).
   */
  static async listExports(
    target: NbdConnectTarget,
    options: Pick<NbdClientOptions, 'tls' | 'connectTimeout' | 'signal'> = {},
  ): Promise<NbdExportListing[]> {
    const { socket, negotiated } = await openConnection(target, options, true);
    socket.destroySoon();
    return negotiated.exports ?? [];
  }

  private constructor(
    rawSocket: net.Socket,
    n: Negotiated,
    exportName: string,
    maxInFlight: number,
    router: ReadRouter | undefined,
  ) {
    this.rawSocket = rawSocket;
    this.socket = n.socket;
    this.size = n.size;
    this.flags = n.flags;
    this.exportName = exportName;
    this.description = n.description;
    this.blockSize = n.blockSize;
    this.structuredReplies = n.structuredReplies;
    this.extendedHeaders = n.extendedHeaders;
    this.tls = n.tls;
    this.handshake = n.handshake;
    this.metaContexts = [...n.contexts.values()];
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.maxInFlight = maxInFlight;
    this.align = n.blockSize?.minimum ?? 1;
    const max = Math.min(n.blockSize?.maximum ?? MAX_PAYLOAD_BYTES, 2 ** 30);
    this.maxIo = Math.max(this.align, max - (max % this.align));

    const parser = new ReplyParser(n.structuredReplies, n.extendedHeaders, n.contexts, {
      lookup: (cookie) => (cookie <= 0xffffffffn ? this.pending.get(Number(cookie)) : undefined),
      complete: (cookie, req, err, value) => {
        this.pending.delete(Number(cookie));
        if (err) req.reject(err);
        else req.resolve(value);
        this.pump();
        if (err instanceof NbdCommandError && err.errnoName === 'ESHUTDOWN') {
          // The server is shutting down: the spec wants a soft disconnect.
          void this.close();
        }
        this.checkDrained();
      },
    });
    const guarded = (fn: () => void) => {
      if (this.broken) return;
      try {
        fn();
      } catch (err) {
        this.fail(
          err instanceof NbdError
            ? err
            : new NbdConnectionError('ERR_VMDISK_NBD_PROTOCOL_ERROR', String(err), err),
        );
      }
    };
    const onData = (chunk: Buffer) => guarded(() => parser.push(chunk));
    const sock = this.socket;
    sock.on('error', (err) => {
      this.lastSocketError = err;
    });
    if (rawSocket !== sock) {
      rawSocket.on('error', (err) => {
        this.lastSocketError ??= err;
      });
    }
    sock.on('close', () => this.onSocketClose());
    if (n.leftover.length) onData(n.leftover);
    if (router) {
      router.setSink({
        bytes: onData,
        directTarget: (min) => (this.broken ? undefined : parser.directTarget(min)),
        advanceDirect: (count) => guarded(() => parser.advanceDirect(count)),
      });
    } else {
      sock.on('data', onData);
    }
    sock.resume();
  }

  get readOnly(): boolean {
    return (this.flags & TransmissionFlag.READ_ONLY) !== 0;
  }
  get canFlush(): boolean {
    return (this.flags & TransmissionFlag.SEND_FLUSH) !== 0;
  }
  get canFua(): boolean {
    return (this.flags & TransmissionFlag.SEND_FUA) !== 0;
  }
  get canTrim(): boolean {
    return (this.flags & TransmissionFlag.SEND_TRIM) !== 0;
  }
  get canWriteZeroes(): boolean {
    return (this.flags & TransmissionFlag.SEND_WRITE_ZEROES) !== 0;
  }
  get canFastZero(): boolean {
    return (this.flags & TransmissionFlag.SEND_FAST_ZERO) !== 0;
  }
  get canCache(): boolean {
    return (this.flags & TransmissionFlag.SEND_CACHE) !== 0;
  }
  get canMultiConn(): boolean {
    return (this.flags & TransmissionFlag.CAN_MULTI_CONN) !== 0;
  }
  get rotational(): boolean {
    return (this.flags & TransmissionFlag.ROTATIONAL) !== 0;
  }
  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }
  /** Requests waiting for room under maxInFlight. */
  get queued(): number {
    return this.waiting.length;
  }

  /**
   * Reads `length` bytes at `offset` into a new buffer, or fills `buf` (its whole length).
   * Reads longer than the server's maximum are split.
   */
  async read(offset: number, lengthOrBuf: number | Uint8Array): Promise<Uint8Array> {
    const buf = typeof lengthOrBuf === 'number' ? null : lengthOrBuf;
    const length = buf ? buf.length : (lengthOrBuf as number);
    this.checkRange(offset, length, true);
    const out = buf ?? Buffer.allocUnsafe(length);
    if (length === 0) return out;
    const parts: Promise<unknown>[] = [];
    for (let done = 0; done < length; done += this.maxIo) {
      const n = Math.min(this.maxIo, length - done);
      parts.push(
        this.submit(Command.READ, 0, offset + done, n, { buf: out.subarray(done, done + n) }),
      );
    }
    await settleAll(parts);
    return out;
  }

  /** Writes `buf` at `offset` (split at the server's maximum). Keep `buf` unchanged until done. */
  async write(offset: number, buf: Uint8Array, options: NbdWriteOptions = {}): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, buf.length, true);
    const flags = this.fuaFlag(options);
    const parts: Promise<unknown>[] = [];
    for (let done = 0; done < buf.length; done += this.maxIo) {
      const n = Math.min(this.maxIo, buf.length - done);
      parts.push(
        this.submit(Command.WRITE, flags, offset + done, n, {
          payload: buf.subarray(done, done + n),
        }),
      );
    }
    await settleAll(parts);
  }

  /** Makes completed writes durable. */
  async flush(): Promise<void> {
    if (!this.canFlush) throw unsupported('FLUSH');
    await this.submit(Command.FLUSH, 0, 0, 0, {});
  }

  /** Discards a range. */
  async trim(offset: number, length: number, options: NbdWriteOptions = {}): Promise<void> {
    if (!this.canTrim) throw unsupported('TRIM');
    this.checkWritable();
    this.checkRange(offset, length, true);
    await this.effectRequests(Command.TRIM, this.fuaFlag(options), offset, length);
  }

  /** Writes zeros over a range. */
  async writeZeroes(
    offset: number,
    length: number,
    options: NbdWriteZeroesOptions = {},
  ): Promise<void> {
    if (!this.canWriteZeroes) throw unsupported('WRITE_ZEROES');
    this.checkWritable();
    this.checkRange(offset, length, true);
    let flags = this.fuaFlag(options);
    if (options.noHole) flags |= CommandFlag.NO_HOLE;
    if (options.fastZero) {
      if (!this.canFastZero) throw unsupported('FAST_ZERO');
      flags |= CommandFlag.FAST_ZERO;
    }
    await this.effectRequests(Command.WRITE_ZEROES, flags, offset, length);
  }

  /** Asks the server to prefetch a range. */
  async cache(offset: number, length: number): Promise<void> {
    if (!this.canCache) throw unsupported('CACHE');
    this.checkRange(offset, length, true);
    await this.effectRequests(Command.CACHE, 0, offset, length);
  }

  /**
   * The block status of a range, per selected meta context: extents from `offset` in order,
   * covering at least one byte (the server may describe less than asked, and its last
   * extent may run past the range).
   */
  async blockStatus(
    offset: number,
    length: number,
    options: NbdBlockStatusOptions = {},
  ): Promise<BlockStatusResult> {
    if (this.metaContexts.length === 0) throw unsupported('BLOCK_STATUS (no meta context)');
    this.checkRange(offset, length, false);
    if (length === 0) throw invalidRequest('BLOCK_STATUS of length 0');
    let n = length;
    if (!this.extendedHeaders) {
      const cap = 0xffffffff - (0xffffffff % this.align);
      n = Math.min(n, cap);
    }
    const flags = options.reqOne ? CommandFlag.REQ_ONE : 0;
    return (await this.submit(Command.BLOCK_STATUS, flags, offset, n, {
      reqOne: options.reqOne === true,
    })) as BlockStatusResult;
  }

  /**
   * Waits for the requests in flight, then sends NBD_CMD_DISC and closes the connection.
   * Requests made after close() fail with ERR_VMDISK_NBD_CLIENT_CLOSED.
   */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.closePromise = (async () => {
      await new Promise<void>((resolve) => {
        this.drainWaiters.push(resolve);
        this.checkDrained();
      });
      if (!this.broken) {
        this.sendHeader(Command.DISC, 0, 0, 0, 0);
        this.discSent = true;
        this.socket.end();
        // The server closes after DISC; one that does not is cut off after a while.
        setTimeout(() => this.socket.destroy(), DISC_LINGER_MS).unref();
      }
      await this.closed;
    })();
    return this.closePromise;
  }

  /** Drops the connection at once; pending requests fail with ERR_VMDISK_NBD_CLIENT_CLOSED. */
  destroy(): void {
    this.closing = true;
    this.fail(new NbdError('ERR_VMDISK_NBD_CLIENT_CLOSED', 'the NBD client was destroyed'));
  }

  // ---- internals ----

  private checkRange(offset: number, length: number, aligned: boolean): void {
    if (!Number.isSafeInteger(offset) || offset < 0) throw invalidRequest(`bad offset ${offset}`);
    if (!Number.isSafeInteger(length) || length < 0) throw invalidRequest(`bad length ${length}`);
    if (offset > this.size || length > this.size - offset) {
      throw invalidRequest(
        `the range ${offset}+${length} is beyond the end of the export (${this.size} bytes)`,
      );
    }
    if (aligned && (offset % this.align !== 0 || length % this.align !== 0)) {
      throw invalidRequest(
        `the range ${offset}+${length} is not aligned to the export's minimum block size ${this.align}`,
      );
    }
  }

  private checkWritable(): void {
    if (this.readOnly) {
      throw new NbdError('ERR_VMDISK_NBD_READ_ONLY', 'the NBD export is read-only');
    }
  }

  private fuaFlag(options: NbdWriteOptions): number {
    if (!options.fua) return 0;
    if (!this.canFua) throw unsupported('FUA');
    return CommandFlag.FUA;
  }

  private async effectRequests(
    command: number,
    flags: number,
    offset: number,
    length: number,
  ): Promise<void> {
    if (length === 0) return;
    const step = this.extendedHeaders ? length : COMPACT_SPLIT;
    const parts: Promise<unknown>[] = [];
    for (let done = 0; done < length; done += step) {
      parts.push(this.submit(command, flags, offset + done, Math.min(step, length - done), {}));
    }
    await settleAll(parts);
  }

  private submit(
    command: number,
    flags: number,
    offset: number,
    length: number,
    extra: { buf?: Uint8Array; payload?: Uint8Array; reqOne?: boolean },
  ): Promise<unknown> {
    if (this.broken) return Promise.reject(this.broken);
    if (this.closing) {
      return Promise.reject(
        new NbdError('ERR_VMDISK_NBD_CLIENT_CLOSED', 'the NBD client is closed or closing'),
      );
    }
    return new Promise((resolve, reject) => {
      const req: PendingRequest = {
        command,
        commandName: COMMAND_NAMES[command] ?? String(command),
        offset,
        length,
        covered: 0,
        resolve,
        reject,
      };
      if (extra.buf) req.buf = extra.buf;
      if (extra.reqOne) req.reqOne = true;
      const send = () => {
        let cookie = this.nextCookie;
        while (this.pending.has(cookie)) cookie = cookie >= 0xffffffff ? 1 : cookie + 1;
        this.nextCookie = cookie >= 0xffffffff ? 1 : cookie + 1;
        this.pending.set(cookie, req);
        let wireFlags = flags;
        if (extra.payload && this.extendedHeaders) wireFlags |= CommandFlag.PAYLOAD_LEN;
        this.sendHeader(command, wireFlags, cookie, offset, length);
        if (extra.payload) this.socket.write(extra.payload);
      };
      if (this.waiting.length === 0 && this.pending.size < this.maxInFlight) send();
      else this.waiting.push({ send, reject });
    });
  }

  /** Sends queued requests while there is room under maxInFlight. */
  private pump(): void {
    while (this.waiting.length > 0 && this.pending.size < this.maxInFlight && !this.broken) {
      this.waiting.shift()!.send();
    }
  }

  private sendHeader(
    command: number,
    flags: number,
    cookie: number,
    offset: number,
    length: number,
  ): void {
    if (!this.corked) {
      // Requests made in one turn leave in one write.
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    const h = encodeRequestHeader(this.extendedHeaders, flags, command, cookie, offset, length);
    this.socket.write(h);
  }

  private checkDrained(): void {
    if ((this.pending.size !== 0 || this.waiting.length !== 0) && !this.broken) return;
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w();
  }

  private onSocketClose(): void {
    if (this.broken) {
      this.resolveClosed(this.closing && this.discSent ? undefined : this.broken);
      return;
    }
    if (this.closing && this.discSent) {
      this.broken = new NbdError('ERR_VMDISK_NBD_CLIENT_CLOSED', 'the NBD client is closed');
      this.checkDrained();
      this.resolveClosed(undefined);
      return;
    }
    const cause = this.lastSocketError;
    this.fail(
      new NbdConnectionError(
        'ERR_VMDISK_NBD_CONNECTION_LOST',
        cause
          ? `the connection to the NBD server broke: ${cause.message}`
          : 'the NBD server closed the connection',
        cause,
      ),
    );
  }

  /** Ends the connection: every pending request fails with `err`. */
  private fail(err: NbdError): void {
    if (this.broken) return;
    this.broken = err;
    const pending = [...this.pending.values(), ...this.waiting];
    this.pending.clear();
    this.waiting = [];
    for (const req of pending) req.reject(err);
    this.checkDrained();
    if (this.socket.destroyed && this.rawSocket.destroyed) {
      this.resolveClosed(err);
    } else {
      this.socket.destroy();
      this.rawSocket.destroy();
      if (this.socket.destroyed && this.socket.closed) this.resolveClosed(err);
    }
  }
}
