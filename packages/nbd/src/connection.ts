// One client connection of the NBD server: its socket's lifecycle (the handshake timer,
// the TLS upgrade of the socket, pausing and resuming reading, closing, the end once
// nothing is in flight). The handshake is server-handshake.ts's, the transmission phase
// server-transmission.ts's.

import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { BufferPool } from './buffer-pool.ts';
import { ByteQueue } from './byte-queue.ts';
import { NbdError } from './errors.ts';
import type { ExportEntry } from './export-entry.ts';
import type { BudgetAccount, MemoryBudget } from './memory-budget.ts';
import { SendQueue } from './send-queue.ts';
import { badClient, Handshake, type Negotiated } from './server-handshake.ts';
import { type ServerTls, startServerTls } from './server-tls.ts';
import { Transmission, type TransmissionLink } from './server-transmission.ts';

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
  /** The connection's TLS handshake succeeded. */
  tlsEstablished(conn: Connection): void;
}

class Closed extends Error {}

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

  /** @internal */
  pauseReading(): void {
    if (!this.readingPaused) {
      this.readingPaused = true;
      this.socket.pause();
    }
  }

  /** @internal */
  resumeReading(): void {
    if (this.readingPaused) {
      this.readingPaused = false;
      this.socket.resume();
    }
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
    this.sendQueue = new SendQueue(secure);
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
    this.transmission = new Transmission(this, agreed, this.sendQueue, this.account);
    this.phase = 'transmission';
    this.socket.write(agreed.reply);
    this.host.attached(this);
    if (this.queue.length > 0) this.transmission.pump();
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
