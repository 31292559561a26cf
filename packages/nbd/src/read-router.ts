// Reading a plain (non-TLS) socket through Node's `onread`, for the client and the server:
// bytes land in one buffer that every read reuses instead of a fresh 64 KiB Buffer per
// read, and a large payload (a READ reply's at the client, a WRITE request's at the
// server) lands straight in the buffer it is for: no copy at all. Whoever consumes the
// bytes (the client's negotiation reader then its reply parser; the server's connection)
// is plugged in with setSink. It parses what a read brought before returning and copies
// what it keeps: the next read overwrites the shared buffer. Given a recv, a read that
// brought only part of a large payload is followed by more reads of the descriptor, until
// the payload is whole or the socket is empty: a unix socket holds about 200 KiB, so a
// 1 MiB payload would otherwise take five turns of the event loop and five calls into
// JavaScript. Reading behind Node's back is safe there: inside the read callback, in
// order, and the socket's level-triggered watch reports what is left. (Measured on a unix
// socket, 4 KiB messages: 137 ms of CPU this way, 709 ms with views carved from fresh
// buffers, whose pages fault in at every read, 1108 ms through 'data' events.)

/** Below this, a payload goes through the shared buffer and is copied. */
const DIRECT_MIN_BYTES = 16 * 1024;
const SHARED_BYTES = 256 * 1024;
/**
 * The read after a payload read straight into its buffer: small, for it likely brings the
 * header of another large WRITE, whose payload is best read straight too, not copied.
 */
const AFTER_DIRECT_BYTES = 16 * 1024;

export interface ReadSink {
  /** Bytes received: a view valid only during the call (copy what must be kept). */
  bytes(view: Buffer): void;
  /** Where the next bytes may go directly (the rest of a payload, when at least `min`). */
  directTarget?(min: number): Uint8Array | undefined;
  /** `n` bytes arrived in the buffer directTarget returned. */
  advanceDirect?(n: number): void;
}

export class ReadRouter {
  private readonly shared = Buffer.allocUnsafe(SHARED_BYTES);
  private sink: ReadSink | undefined;
  private held: Buffer[] = [];
  private lastDirect: Uint8Array | undefined;
  /** The last read was straight into a payload: the next staged read is a small one. */
  private afterDirect = false;
  private readonly sharedAfterDirect = this.shared.subarray(0, AFTER_DIRECT_BYTES);

  private readonly recv: ((buf: Uint8Array) => number) | undefined;

  /** `recv`: reads the socket without waiting (bytes, 0 at its end, or -errno). */
  constructor(recv?: (buf: Uint8Array) => number) {
    this.recv = recv;
  }

  /** The `onread` option of net.connect. */
  readonly onread = {
    buffer: (): Uint8Array => {
      const d = this.sink?.directTarget?.(DIRECT_MIN_BYTES);
      this.lastDirect = d;
      return d ?? (this.afterDirect ? this.sharedAfterDirect : this.shared);
    },
    // Returning false would pause the socket: this always goes on reading.
    callback: (n: number, buf: Uint8Array): boolean => {
      if (this.lastDirect !== undefined && buf === this.lastDirect) {
        this.lastDirect = undefined;
        this.afterDirect = true;
        this.sink!.advanceDirect!(n);
        this.readOnDirect();
        return true;
      }
      this.afterDirect = false;
      const view = this.shared.subarray(0, n);
      if (this.sink) {
        this.sink.bytes(view);
        this.readOnDirect();
      } else this.held.push(Buffer.from(view));
      return true;
    },
  };

  /**
   * Reads on into the payload while the sink wants it and the socket has bytes. An end or
   * an error is left for the socket's own next read to find and report.
   */
  private readOnDirect(): void {
    const recv = this.recv;
    if (recv === undefined) return;
    for (;;) {
      const d = this.sink?.directTarget?.(DIRECT_MIN_BYTES);
      if (d === undefined) return;
      const n = recv(d);
      if (n <= 0) return;
      this.afterDirect = true;
      this.sink!.advanceDirect!(n);
    }
  }

  /** Plugs in the consumer (undefined: bytes are kept until one is plugged in). */
  setSink(sink: ReadSink | undefined): void {
    this.sink = sink;
    this.lastDirect = undefined;
    if (!sink) return;
    while (this.held.length > 0 && this.sink === sink) sink.bytes(this.held.shift()!);
  }
}
