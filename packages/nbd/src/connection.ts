// One client connection of the NBD server: its socket's lifecycle (the handshake timer,
// the TLS upgrade of the socket, pausing and resuming reading, closing, the end once
// nothing is in flight). The handshake is server-handshake.ts's, the transmission phase
// server-transmission.ts's.

import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { getSystemErrorName } from 'node:util';
import type { BufferPool } from './buffer-pool.ts';
import { ByteQueue } from './byte-queue.ts';
import { NbdError } from './errors.ts';
import type { ExportEntry } from './export-entry.ts';
import type { HandedOff, TransmissionState } from './handoff.ts';
import type { BudgetAccount, MemoryBudget } from './memory-budget.ts';
import type { ReadRouter } from './read-router.ts';
import { type FileSender, SendQueue } from './send-queue.ts';
import { badClient, Handshake, type Negotiated } from './server-handshake.ts';
import type { ReplyModeValue } from './server-replies.ts';
import { type ServerTls, startServerTls } from './server-tls.ts';
import { Transmission, type TransmissionLink } from './server-transmission.ts';

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly tls: ServerTls;
  /** Sends files' bytes to plain sockets (NbdServerOptions.fileSender). */
  readonly fileSender: FileSender | undefined;
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
  /** The connection's TLS handshake succeeded. */
  tlsEstablished(conn: Connection): void;
}

class Closed extends Error {}

/** Node's socket handle (a libuv stream): its descriptor, its reading stopped and started. */
interface SocketHandle {
  fd?: number;
  reading: boolean;
  readStop(): number;
  readStart(): number;
}

/** The libuv handle under a socket (Node's `_handle`), if it has one. */
function handleOf(socket: Socket): SocketHandle | undefined {
  return (socket as unknown as { _handle?: SocketHandle | null })._handle ?? undefined;
}

/** The descriptor under a socket (Node keeps it on the socket's handle), if it has one. */
export function socketFd(socket: Socket): number | undefined {
  const fd = handleOf(socket)?.fd;
  return fd !== undefined && fd >= 0 ? fd : undefined;
}

export class Connection implements TransmissionLink {
  readonly id: number;
  readonly remoteAddress: string;
  readonly remotePort: number | undefined;
  /** The export chosen (set when transmission starts). */
  export: ExportEntry | undefined;
  tlsActive = false;

  private readonly host: ConnectionHost;
  /** Bytes received and not taken yet. */
  readonly queue = new ByteQueue();
  socketClosed = false;
  readingPaused = false;
  /**
   * The queue's newest bytes are the read router's shared buffer until pump returns:
   * a payload is copied out of the queue, never taken as a view of it.
   */
  receivedBorrowed = false;

  private readonly raw: Socket;
  private socket: Duplex;
  private sendQueue: SendQueue;
  private phase: 'negotiation' | 'transmission' | 'closing' | 'closed' = 'negotiation';
  private waiter:
    | { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** This connection's part of the memory budget. */
  private readonly account: BudgetAccount;
  private transmission: Transmission | undefined;
  /** Served elsewhere (the export's handoff took it). */
  private handedOff: HandedOff | undefined;
  private finalized = false;

  /**
   * With `adopted`, the connection starts in transmission (another server negotiated).
   * With `reader`, `raw` was made with its `onread`: what it reads comes through it.
   */
  constructor(
    id: number,
    raw: Socket,
    host: ConnectionHost,
    adopted?: TransmissionState & { export: ExportEntry },
    reader?: ReadRouter,
  ) {
    this.id = id;
    this.raw = raw;
    this.socket = raw;
    this.host = host;
    this.account = host.budget.account(this.onRoom);
    this.remoteAddress = raw.remoteAddress ?? 'unix';
    this.remotePort = raw.remotePort;
    const fd = socketFd(raw);
    const sender = host.fileSender;
    this.sendQueue = new SendQueue(
      raw,
      sender && fd !== undefined ? { sockFd: fd, sender } : undefined,
    );
    raw.setNoDelay?.(true);
    // Idle clients may stay for ever; dead ones are found out and dropped.
    raw.setKeepAlive?.(true, 60_000);
    if (reader !== undefined) {
      reader.setSink({
        bytes: this.onStaged,
        directTarget: (min) =>
          this.phase === 'transmission' && !raw.destroyed
            ? this.transmission?.payloadSpace(min)
            : undefined,
        advanceDirect: (n) => this.transmission?.payloadReceived(n),
      });
      this.receivedBorrowed = true;
    } else raw.on('data', this.onData);
    raw.on('error', this.onSocketError);
    raw.on('close', this.onClose);
    if (adopted !== undefined) {
      if (adopted.pending.length > 0) this.queue.push(Buffer.from(adopted.pending));
      this.enterTransmission({
        export: adopted.export,
        mode: adopted.mode as ReplyModeValue,
        contexts: [...adopted.contexts],
        reply: Buffer.from(adopted.reply),
      });
      return;
    }
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

  /** @internal */
  get maxInFlight(): number {
    return this.host.maxInFlight;
  }

  /** @internal */
  get pool(): BufferPool {
    return this.host.pool;
  }

  /** @internal: in transmission, taking requests. */
  get active(): boolean {
    return this.phase === 'transmission';
  }

  /** Hard disconnect: the socket goes at once; what is in flight completes unanswered. */
  destroy(): void {
    if (this.handedOff !== undefined) {
      this.handedOff.destroy();
      return;
    }
    this.socket.destroy();
    if (this.socket !== this.raw) this.raw.destroy();
  }

  // ---- the socket ----

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closing' || this.phase === 'closed') return;
    this.queue.push(chunk);
    if (this.phase === 'negotiation') {
      const w = this.waiter;
      if (w !== undefined && this.queue.length >= w.n) {
        this.waiter = undefined;
        w.resolve(this.queue.take(w.n));
      }
    } else {
      this.transmission?.pump();
    }
  };

  /** Bytes read into the read router's shared buffer, which its next read reuses. */
  private readonly onStaged = (chunk: Buffer): void => {
    if (this.phase === 'negotiation') {
      // The handshake keeps what it reads across awaits: its own copy.
      this.onData(Buffer.from(chunk));
      return;
    }
    this.onData(chunk);
    this.queue.keep();
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
    this.queue.clear();
    this.transmission?.closed();
    this.account.close();
    this.idle();
  };

  /** The memory budget may have room for what this connection waits for. */
  private readonly onRoom = (): void => {
    if (this.phase === 'transmission') this.transmission?.pump();
  };

  private read(n: number): Promise<Buffer> {
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    if (this.socketClosed) return Promise.reject(new Closed());
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /**
   * @internal
   * A socket read through a ReadRouter is stopped at its handle, as Node itself does when
   * an `onread` callback returns false: its bytes never go through the stream's buffer,
   * and the stream's pause and resume (state, events, a tick) cost more than the handle's
   * (at a queue depth above maxInFlight, a pause and a resume per request).
   */
  pauseReading(): void {
    if (this.readingPaused) return;
    this.readingPaused = true;
    const h = this.readHandle();
    if (h === undefined) this.socket.pause();
    else if (h.reading) {
      h.reading = false;
      h.readStop();
    }
  }

  /** @internal */
  resumeReading(): void {
    if (!this.readingPaused) return;
    this.readingPaused = false;
    const h = this.readHandle();
    if (h === undefined) this.socket.resume();
    else if (!h.reading) {
      h.reading = true;
      const err = h.readStart();
      if (err < 0) {
        const code = getSystemErrorName(err);
        this.socket.destroy(Object.assign(new Error(`read ${code}`), { errno: err, code }));
      }
    }
  }

  /** The handle under a plain socket read through a ReadRouter (receivedBorrowed). */
  private readHandle(): SocketHandle | undefined {
    if (!this.receivedBorrowed || this.socket !== this.raw) return undefined;
    return handleOf(this.raw);
  }

  /** @internal: no more requests are taken. */
  closing(): void {
    this.phase = 'closing';
  }

  /** @internal */
  error(err: NbdError): void {
    this.host.error(this, err);
  }

  // ---- the handshake ----

  private async negotiate(): Promise<void> {
    const conn = this;
    const handshake = new Handshake({
      tls: this.host.tls,
      read: (n) => this.read(n),
      write: (buf) => {
        this.socket.write(buf);
      },
      get queued() {
        return conn.queue.length;
      },
      startTls: (ack) => this.startTls(ack),
      findExport: (name) => this.host.findExport(name),
      listExports: () => this.host.listExports(),
    });
    const agreed = await handshake.run();
    if (agreed === undefined) {
      // NBD_OPT_ABORT, answered: the connection ends.
      this.phase = 'closing';
      this.idle();
      return;
    }
    this.enterTransmission(agreed);
  }

  /** Sends the STARTTLS ACK in plain text, then speaks TLS on the socket. */
  private async startTls(ack: Buffer): Promise<void> {
    const raw = this.raw;
    raw.removeListener('data', this.onData);
    raw.pause();
    raw.write(ack);
    const secure = await startServerTls(raw, this.host.tls);
    if (this.socketClosed) throw new Closed();
    this.socket = secure;
    this.sendQueue = new SendQueue(secure, undefined, true);
    secure.on('data', this.onData);
    secure.on('error', this.onSocketError);
    secure.on('close', this.onClose);
    this.tlsActive = true;
    this.host.tlsEstablished(this);
  }

  private enterTransmission(agreed: Negotiated): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.export = agreed.export;
    if (!this.tlsActive && agreed.export.handoff !== undefined && this.handOff(agreed)) return;
    this.transmission = new Transmission(this, agreed, this.sendQueue, this.account);
    this.phase = 'transmission';
    this.socket.write(agreed.reply);
    this.host.attached(this);
    if (this.queue.length > 0) this.transmission.pump();
  }

  /** Offers the connection to its export's handoff; true when taken. */
  private handOff(agreed: Negotiated): boolean {
    const raw = this.raw;
    // No more reads from here: what the stream has buffered goes with the state, what
    // libuv has not read stays in the kernel for the taker (libuv reads only between
    // ticks, so stopping after the synchronous drain loses nothing).
    raw.removeListener('data', this.onData);
    raw.pause();
    const chunks: Buffer[] = [];
    if (this.queue.length > 0) chunks.push(this.queue.take(this.queue.length));
    for (let c = raw.read() as Buffer | null; c !== null; c = raw.read() as Buffer | null) {
      chunks.push(c);
    }
    // As net.Socket's own pause with its `onread` option: stop the handle (and say so).
    const handle = handleOf(raw);
    if (typeof handle?.readStop === 'function') {
      handle.readStop();
      handle.reading = false;
    }
    raw.removeListener('error', this.onSocketError);
    raw.removeListener('close', this.onClose);
    const state: TransmissionState = {
      mode: agreed.mode,
      contexts: agreed.contexts,
      reply: agreed.reply,
      pending: Buffer.concat(chunks),
    };
    let taken: HandedOff | undefined;
    try {
      taken = agreed.export.handoff?.({
        id: this.id,
        socket: raw,
        state,
        done: () => this.remoteDone(),
      });
    } catch (e) {
      this.host.error(this, badClient(`handing the connection off failed: ${String(e)}`));
    }
    if (taken === undefined) {
      // Declined: served here after all, with what was already read.
      raw.on('data', this.onData);
      raw.on('error', this.onSocketError);
      raw.on('close', this.onClose);
      if (state.pending.length > 0) this.queue.push(Buffer.from(state.pending));
      // The stream may think a read is still pending (it is not): start the handle again.
      if (handle?.readStart) {
        handle.readStart();
        handle.reading = true;
      }
      raw.resume();
      return false;
    }
    this.handedOff = taken;
    this.phase = 'transmission';
    this.host.attached(this);
    return true;
  }

  /** The connection handed off is over. */
  private remoteDone(): void {
    if (this.socketClosed) return;
    this.socketClosed = true;
    this.phase = 'closed';
    this.account.close();
    this.idle();
  }

  // ---- the end ----

  /** @internal: closes once nothing is in flight (the socket first, then the host is told). */
  idle(): void {
    if ((this.transmission?.inFlight ?? 0) > 0) return;
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
