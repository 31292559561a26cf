// The NBD server: listeners (TCP and unix sockets), exports, connections, counters and
// events. It serves any ExportTarget and knows nothing of what is behind one.

import { EventEmitter } from 'node:events';
import { unlink } from 'node:fs/promises';
import * as net from 'node:net';
import { type AoHandle, type AoHow, type AoOptions, type AoPromise, runAo } from '@vmdisk/ao';
import { BufferPool } from './buffer-pool.ts';
import { Connection, type ConnectionHost, socketFd } from './connection.ts';
import { NbdError, NbdSystemError } from './errors.ts';
import type { ExportEntry, ExportStats } from './export-entry.ts';
import type { BlockSizeConstraints, ExportBitmap, ExportTarget } from './export-target.ts';
import type { HandedOff, TransmissionOffer, TransmissionState } from './handoff.ts';
import { DEFAULT_MEMORY_BUDGET, MemoryBudget } from './memory-budget.ts';
import {
  Command,
  MAX_PAYLOAD_BYTES,
  MAX_STRING_BYTES,
  META_CONTEXT_DIRTY_BITMAP,
} from './protocol.ts';
import { ReadRouter } from './read-router.ts';
import type { FileSender } from './send-queue.ts';
import { type NbdServerTlsOptions, resolveServerTls, type ServerTls } from './server-tls.ts';
import { listenUnixSocket } from './unix-socket.ts';
import { withDefaults } from './with-defaults.ts';

export type { ExportStats } from './export-entry.ts';

export interface NbdServerOptions {
  /** Connections beyond this many are closed at once (default 1024). */
  maxConnections?: number;
  /** Clients that have not chosen an export after this long are dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /** Requests served at once per connection; at the limit the socket is not read (16). */
  maxInFlight?: number;
  /**
   * Bytes of request data in flight, all connections together: READ data read and not
   * yet handed to the kernel, WRITE payloads received and not yet written. Default 256
   * MiB: 64 busy connections each with a full window of 16 x 256 KiB requests. Each
   * connection has a share (the budget divided among the connections using it, at least
   * 1 MiB: one alone may fill its window of 16 x 1 MiB); a connection at its share, or
   * when the budget is full, stops reading its socket until its requests finish. READs and WRITEs over 1 MiB
   * are served in 1 MiB pieces that take budget each, so a client that never reads its
   * replies holds at most 2 MiB of them; a request larger than the budget progresses alone.
   */
  requestMemoryBudget?: number;
  /** The export a client asking for "" gets when none is named "" (default: the only one). */
  defaultExport?: string;
  tls?: NbdServerTlsOptions;
  /**
   * Called with each accepted socket before anything is read from it or written to it:
   * what Node's net module cannot set (vm-disk enlarges unix sockets' send buffers). A
   * throw refuses the connection (the 'error' event says why).
   */
  configureSocket?: (socket: net.Socket) => void;
  /**
   * dup(2), for the server to read sockets into its own memory: Node's net.Server gives
   * sockets that read into buffers Node allocates (64 KiB each), which the server then
   * copies. With it, each accepted socket (of a server without TLS) is taken over on a
   * duplicate of its fd, made with `onread`, and WRITE payloads are read straight into
   * the buffers they are written from (read-router.ts). vm-disk passes
   * @vmdisk/engine's dupFd. It returns the new fd; when it throws or returns a negative
   * errno, the socket is read as Node gives it.
   */
  dupFd?: ((fd: number) => number) | undefined;
  /**
   * recv(2) without waiting (MSG_DONTWAIT), for the sockets taken over with dupFd: the
   * bytes read, 0 at the end of the stream, or -errno. With it, a read that brought only
   * part of a WRITE payload is followed at once by more, until the payload is whole or
   * the socket has nothing more (as QEMU's server reads), instead of a turn of the event
   * loop for each read. vm-disk passes @vmdisk/engine's recvNow.
   */
  recv?: ((fd: number, buf: Uint8Array) => number) | undefined;
  /**
   * Sends a file's bytes to a socket (sendfile): with it, a READ of 32 KiB or more whose
   * bytes the export's target has in a cached file (ExportTarget.fileRange) goes to a
   * plain (non-TLS) client straight from that file, never copied through a buffer of
   * ours. vm-disk passes @vmdisk/engine's.
   */
  fileSender?: FileSender | undefined;
}

export type ListenOptions =
  | { host?: string; port: number }
  | {
      path: string;
      /** The socket file's mode (default 0o600). */
      mode?: number;
    };

export type ListenAddress = { host: string; port: number } | { path: string };

export interface ExportOptions {
  name: string;
  description?: string;
  target: ExportTarget;
  /** Default false: read-only. */
  writable?: boolean;
  /** Advertise CAN_MULTI_CONN when the target guarantees it (default true). */
  multiConn?: boolean;
  /** Overrides the target's blockSize (the maximum is capped at 32 MiB). */
  blockSize?: BlockSizeConstraints;
  /** Overrides the target's dirtyBitmaps (offered as qemu:dirty-bitmap:NAME contexts). */
  dirtyBitmaps?: readonly ExportBitmap[];
  /**
   * Offer qemu:allocation-depth when the target reports depth (default true; QEMU's
   * block-export-add offers it only with `allocation-depth: true`).
   */
  allocationDepth?: boolean;
  /**
   * Serves connections elsewhere (another thread): each plain (not TLS) connection that
   * enters transmission on the export is offered; one taken counts as the export's
   * connection until the taker calls `done`. Returning undefined serves it here.
   */
  handoff?: (offer: TransmissionOffer) => HandedOff | undefined;
}

export interface ExportInfo {
  name: string;
  description: string;
  size: number;
  writable: boolean;
  removing: boolean;
  stats: ExportStats;
}

/** What the events carry. */
export interface ConnectionEvent {
  /** The server's number for the connection. */
  id: number;
  remoteAddress: string;
  remotePort?: number;
  /** The export, once the client chose one. */
  export?: string;
  tls: boolean;
}

export interface ErrorEvent extends ConnectionEvent {
  error: NbdError;
}

export interface NbdServerEvents {
  /** A client entered transmission on an export. */
  connection: [ConnectionEvent];
  /** A connection closed (whatever its phase) and nothing of it is in flight. */
  disconnect: [ConnectionEvent];
  /** Something went wrong with one client; the server goes on. Only if listened to. */
  error: [ErrorEvent];
}

/** Request counters by command type: one for each Command value. */
const COMMAND_TYPES = Math.max(...Object.values(Command)) + 1;

/** The server's counters of connections (all exports, and none: before one is chosen). */
export interface ServerCounters {
  /** Connections accepted. */
  connections: number;
  /** Connections that failed before transmission (bad handshake, TLS failure, timeout). */
  negotiationFailures: number;
  /** TLS handshakes that succeeded. */
  tlsHandshakes: number;
}

const DEFAULT_BLOCK_SIZE: BlockSizeConstraints = {
  minimum: 1,
  preferred: 4096,
  maximum: MAX_PAYLOAD_BYTES,
};

const invalid = (message: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', message);

const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

function checkBlockSize(bs: BlockSizeConstraints): BlockSizeConstraints {
  const maximum = Math.min(bs.maximum, MAX_PAYLOAD_BYTES);
  if (!isPowerOfTwo(bs.minimum) || bs.minimum > 65536) {
    throw invalid(`blockSize.minimum ${bs.minimum}: a power of two up to 64 KiB`);
  }
  if (!isPowerOfTwo(bs.preferred) || bs.preferred < bs.minimum || bs.preferred > 32 * 1024 * 1024) {
    throw invalid(`blockSize.preferred ${bs.preferred}: a power of two, at least the minimum`);
  }
  if (!Number.isInteger(maximum) || maximum < bs.minimum || maximum % bs.minimum !== 0) {
    throw invalid(`blockSize.maximum ${bs.maximum}: a multiple of the minimum`);
  }
  return { minimum: bs.minimum, preferred: bs.preferred, maximum };
}

/**
 * Bitmaps an export offers: named (a context name within the limit, no NUL). A name may
 * come twice (QEMU lists both; a client selecting it gets the first).
 */
function checkBitmaps(bitmaps: readonly ExportBitmap[]): readonly ExportBitmap[] {
  for (const b of bitmaps) {
    const name = b?.name;
    const context = `${META_CONTEXT_DIRTY_BITMAP}${name}`;
    if (
      typeof name !== 'string' ||
      name === '' ||
      name.includes('\0') ||
      Buffer.byteLength(context) > MAX_STRING_BYTES ||
      typeof b.status !== 'function'
    ) {
      throw invalid('dirtyBitmaps: each a name (not empty, no NUL, short enough) and status');
    }
  }
  return bitmaps;
}

export class NbdServer extends EventEmitter<NbdServerEvents> {
  private readonly exports = new Map<string, ExportEntry>();
  private readonly sockets: Array<{ server: net.Server; path?: string }> = [];
  private readonly connections = new Set<Connection>();
  /** Connection counters (read them; the server counts). */
  readonly counters: ServerCounters = { connections: 0, negotiationFailures: 0, tlsHandshakes: 0 };
  private readonly drainWaiters = new Map<ExportEntry, Array<() => void>>();
  private readonly closeWaiters = new Map<Connection, () => void>();
  private readonly host: ConnectionHost;
  private readonly budget: MemoryBudget;
  private readonly maxConnections: number;
  private readonly defaultExport: string | undefined;
  private readonly configureSocket: ((socket: net.Socket) => void) | undefined;
  private readonly dupFd: ((fd: number) => number) | undefined;
  private readonly recv: ((fd: number, buf: Uint8Array) => number) | undefined;
  private nextId = 1;
  private closing = false;

  constructor(options: NbdServerOptions = {}) {
    super();
    this.maxConnections = options.maxConnections ?? 1024;
    this.defaultExport = options.defaultExport;
    this.configureSocket = options.configureSocket;
    this.dupFd = options.dupFd;
    this.recv = options.recv;
    const handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    const maxInFlight = options.maxInFlight ?? 16;
    const budget = options.requestMemoryBudget ?? DEFAULT_MEMORY_BUDGET;
    if (!(Number.isSafeInteger(budget) && budget > 0)) {
      throw invalid('requestMemoryBudget: an integer > 0 (bytes)');
    }
    this.budget = new MemoryBudget(budget);
    if (!(Number.isInteger(maxInFlight) && maxInFlight >= 1)) {
      throw invalid('maxInFlight: an integer >= 1');
    }
    if (!(handshakeTimeoutMs > 0)) throw invalid('handshakeTimeoutMs: > 0');
    const tls: ServerTls = resolveServerTls(options.tls);
    this.host = {
      tls,
      fileSender: options.fileSender,
      handshakeTimeoutMs,
      maxInFlight,
      budget: this.budget,
      pool: new BufferPool(),
      findExport: (name) => this.findExport(name),
      listExports: () => [...this.exports.values()].filter((e) => !e.removing),
      attached: (conn) => {
        const exp = conn.export!;
        exp.connections.add(conn);
        exp.stats.connections++;
        exp.stats.connectionsTotal++;
        this.emit('connection', this.describe(conn));
      },
      closed: (conn) => this.connectionClosed(conn),
      tlsEstablished: () => {
        this.counters.tlsHandshakes++;
      },
      error: (conn, error) => {
        // Before transmission: the client never got to an export.
        if (conn.export === undefined) this.counters.negotiationFailures++;
        if (this.listenerCount('error') > 0) this.emit('error', { ...this.describe(conn), error });
      },
    };
  }

  /** Listens on a TCP address or a unix socket; resolves with the address bound. */
  async listen(options: ListenOptions): Promise<ListenAddress> {
    if (this.closing) throw new NbdError('ERR_VMDISK_NBD_SERVER_CLOSED', 'the server is closed');
    const server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
    const where =
      'path' in options ? options.path : `${options.host ?? '127.0.0.1'}:${options.port}`;
    try {
      if ('path' in options) {
        await listenUnixSocket(server, options.path, options.mode ?? 0o600);
      } else {
        await new Promise<void>((resolve, reject) => {
          server.once('error', reject);
          server.listen(options.port, options.host ?? '127.0.0.1', resolve);
        });
      }
    } catch (err) {
      server.close();
      throw new NbdSystemError('ERR_VMDISK_NBD_LISTEN_FAILED', `cannot listen on ${where}`, err);
    }
    server.on('error', () => {});
    if ('path' in options) {
      this.sockets.push({ server, path: options.path });
      return { path: options.path };
    }
    this.sockets.push({ server });
    const addr = server.address() as net.AddressInfo;
    return { host: addr.address, port: addr.port };
  }

  addExport(options: ExportOptions): void {
    if (this.closing) throw new NbdError('ERR_VMDISK_NBD_SERVER_CLOSED', 'the server is closed');
    const { name, target } = options;
    if (
      typeof name !== 'string' ||
      Buffer.byteLength(name) > MAX_STRING_BYTES ||
      name.includes('\0')
    ) {
      throw invalid(`export name: a string of at most ${MAX_STRING_BYTES} bytes without NUL`);
    }
    const description = options.description ?? '';
    if (Buffer.byteLength(description) > MAX_STRING_BYTES || description.includes('\0')) {
      throw invalid('export description: at most 4096 bytes without NUL');
    }
    if (this.exports.has(name)) {
      throw new NbdError('ERR_VMDISK_NBD_EXPORT_EXISTS', `export "${name}" already exists`);
    }
    if (typeof target?.size !== 'function' || typeof target.read !== 'function') {
      throw invalid('target: an ExportTarget (size and read at least)');
    }
    const writable = options.writable ?? false;
    if (writable && typeof target.write !== 'function') {
      throw invalid(`export "${name}": a writable export needs a target with write`);
    }
    const blockSize = checkBlockSize(options.blockSize ?? target.blockSize ?? DEFAULT_BLOCK_SIZE);
    const bitmaps = checkBitmaps(options.dirtyBitmaps ?? target.dirtyBitmaps ?? []);
    this.exports.set(name, {
      name,
      description,
      target: withDefaults(target, blockSize, bitmaps, options.allocationDepth ?? true),
      writable,
      multiConn: options.multiConn ?? true,
      blockSize,
      stats: {
        requests: 0,
        bytesRead: 0,
        bytesWritten: 0,
        errors: 0,
        inFlight: 0,
        connections: 0,
        connectionsTotal: 0,
        commands: new Array<number>(COMMAND_TYPES).fill(0),
      },
      connections: new Set(),
      handoff: options.handoff,
      removing: false,
    });
  }

  /**
   * Serves a connection another server negotiated and handed off (TransmissionOffer) on
   * this server's export `exportName`: `socket` is the same client's (e.g. made from its
   * fd in a worker thread). The handshake's reply is sent first. Returns the server's
   * number for the connection (its events carry it); an unknown export (or a server
   * closing) ends the connection at once: undefined.
   */
  adopt(socket: net.Socket, exportName: string, state: TransmissionState): number | undefined {
    const exp = this.exports.get(exportName);
    if (this.closing || exp === undefined || exp.removing) {
      socket.on('error', () => {});
      socket.destroy();
      return undefined;
    }
    const id = this.nextId++;
    this.counters.connections++;
    this.connections.add(new Connection(id, socket, this.host, { export: exp, ...state }));
    return id;
  }

  /**
   * Removes an export, as an asynchronous operation of @vmdisk/ao, with QEMU's
   * block-export-del semantics. 'safe' (the default): refused while clients are attached
   * to the export (ERR_VMDISK_NBD_EXPORT_IN_USE, an initiation failure: nothing changes,
   * they go on being served); clients that sent NBD_CMD_DISC are leaving, not attached,
   * and finish their requests. 'hard': the attached clients are disconnected. Either way
   * no new client gets the export, and it completes once nothing of the clients' is in
   * flight: the target is no longer touched. Clients still negotiating are not attached:
   * they can no longer choose the export. Without `how` it
   * returns a promise (rejected on an initiation failure); with `{ callback }` or
   * `{ forEvent, queue }` a handle (an initiation failure is thrown). An unknown export is
   * an initiation failure; a hard removal of an export already being removed joins it.
   */
  removeExport(name: string, mode?: 'safe' | 'hard'): AoPromise<void>;
  removeExport(
    name: string,
    mode: 'safe' | 'hard',
    how: AoHow<void>,
    options?: AoOptions,
  ): AoHandle<void>;
  removeExport(
    name: string,
    mode: 'safe' | 'hard' = 'safe',
    how?: AoHow<void>,
    options: AoOptions = {},
  ): AoPromise<void> | AoHandle<void> {
    return runAo<void>(
      'nbd.removeExport',
      how,
      () => {
        const exp = this.exports.get(name);
        if (exp === undefined) {
          throw new NbdError('ERR_VMDISK_NBD_NO_SUCH_EXPORT', `no export "${name}"`);
        }
        const n = [...exp.connections].filter((c) => !c.leaving).length;
        if (mode === 'safe' && n > 0) {
          throw new NbdError(
            'ERR_VMDISK_NBD_EXPORT_IN_USE',
            `export "${name}" still in use (${n} client${n === 1 ? '' : 's'} connected)`,
          );
        }
        exp.removing = true;
        const drained = new Promise<void>((resolve) => {
          const list = this.drainWaiters.get(exp) ?? [];
          list.push(resolve);
          this.drainWaiters.set(exp, list);
        });
        // Those leaving (after NBD_CMD_DISC) finish their requests either way.
        if (mode === 'hard') for (const conn of exp.connections) conn.destroy();
        this.checkDrained(exp);
        return drained;
      },
      options,
    ) as AoPromise<void> | AoHandle<void>;
  }

  listExports(): ExportInfo[] {
    return [...this.exports.values()].map((e) => ({
      name: e.name,
      description: e.description,
      size: e.target.size(),
      writable: e.writable,
      removing: e.removing,
      stats: { ...e.stats, commands: [...e.stats.commands] },
    }));
  }

  /** The counters of one export (a snapshot). */
  exportStats(name: string): ExportStats {
    const exp = this.exports.get(name);
    if (exp === undefined)
      throw new NbdError('ERR_VMDISK_NBD_NO_SUCH_EXPORT', `no export "${name}"`);
    return { ...exp.stats, commands: [...exp.stats.commands] };
  }

  /** The request memory budget (bytes) and how much of it the connections hold now. */
  get requestMemory(): { budget: number; inUse: number } {
    return { budget: this.budget.limit, inUse: this.budget.used };
  }

  /** Connections open now, in any phase. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Stops listening, disconnects every client and resolves once nothing is in flight
   * (unix socket files are removed).
   */
  async close(): Promise<void> {
    this.closing = true;
    const listeners = this.sockets.splice(0);
    // Stop accepting; server.close() completes only once every connection has ended, so
    // the connections are ended below, not waited for first.
    const stopped = listeners.map(
      ({ server }) => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    const gone = [...this.exports.keys()].map((name) => this.removeExport(name, 'hard'));
    const pending = [...this.connections].map(
      (conn) =>
        new Promise<void>((resolve) => {
          this.closeWaiters.set(conn, resolve);
          conn.destroy();
        }),
    );
    await Promise.all([...stopped, ...gone, ...pending]);
    for (const { path } of listeners) if (path !== undefined) await unlink(path).catch(() => {});
  }

  // ---- internals ----

  private findExport(name: string): ExportEntry | undefined {
    let exp = this.exports.get(name);
    if (exp === undefined && name === '') {
      if (this.defaultExport !== undefined) exp = this.exports.get(this.defaultExport);
      else if (this.exports.size === 1) exp = this.exports.values().next().value;
    }
    return exp !== undefined && !exp.removing ? exp : undefined;
  }

  private accept(socket: net.Socket): void {
    const id = this.nextId++;
    if (this.closing || this.connections.size >= this.maxConnections) {
      this.refuse(
        id,
        socket,
        new NbdError(
          'ERR_VMDISK_NBD_TOO_MANY_CONNECTIONS',
          `connection refused: ${this.closing ? 'the server is closing' : `${this.maxConnections} connections open`}`,
        ),
      );
      return;
    }
    try {
      this.configureSocket?.(socket);
    } catch (err) {
      const message = `connection refused: configureSocket failed: ${String(err)}`;
      this.refuse(id, socket, new NbdError('ERR_VMDISK_NBD_CONFIGURE_SOCKET', message));
      return;
    }
    this.counters.connections++;
    const own = this.takeOver(socket);
    const conn = own
      ? new Connection(id, own.socket, this.host, undefined, own.reader)
      : new Connection(id, socket, this.host);
    this.connections.add(conn);
  }

  /** The accepted socket on a duplicate of its fd, read by a ReadRouter (see dupFd). */
  private takeOver(socket: net.Socket): { socket: net.Socket; reader: ReadRouter } | undefined {
    if (this.dupFd === undefined || this.host.tls.mode !== 'off') return undefined;
    const fd = socketFd(socket);
    if (fd === undefined) return undefined;
    let dup: number;
    try {
      dup = this.dupFd(fd);
    } catch {
      return undefined;
    }
    if (dup < 0) return undefined;
    const recv = this.recv;
    const reader = new ReadRouter(recv && ((buf) => recv(dup, buf)));
    const own = new net.Socket({ fd: dup, readable: true, writable: true, onread: reader.onread });
    socket.on('error', () => {});
    socket.destroy();
    return { socket: own, reader };
  }

  private refuse(id: number, socket: net.Socket, error: NbdError): void {
    if (this.listenerCount('error') > 0) {
      this.emit('error', { id, remoteAddress: socket.remoteAddress ?? 'unix', tls: false, error });
    }
    socket.on('error', () => {});
    socket.destroy();
  }

  private describe(conn: Connection): ConnectionEvent {
    return {
      id: conn.id,
      remoteAddress: conn.remoteAddress,
      ...(conn.remotePort !== undefined ? { remotePort: conn.remotePort } : {}),
      ...(conn.export !== undefined ? { export: conn.export.name } : {}),
      tls: conn.tlsActive,
    };
  }

  private connectionClosed(conn: Connection): void {
    this.connections.delete(conn);
    const exp = conn.export;
    if (exp?.connections.delete(conn)) {
      exp.stats.connections--;
      this.checkDrained(exp);
    }
    this.emit('disconnect', this.describe(conn));
    this.closeWaiters.get(conn)?.();
    this.closeWaiters.delete(conn);
  }

  private checkDrained(exp: ExportEntry): void {
    if (!exp.removing || exp.connections.size > 0) return;
    if (this.exports.get(exp.name) === exp) this.exports.delete(exp.name);
    const waiters = this.drainWaiters.get(exp);
    this.drainWaiters.delete(exp);
    for (const resolve of waiters ?? []) resolve();
  }
}
