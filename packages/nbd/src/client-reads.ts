// Reading a plain (non-TLS) client socket through Node's `onread`: bytes land in one
// reusable buffer instead of a fresh Buffer per read, and the payload of a large READ
// reply lands straight in the caller's buffer (no copy at all). Whoever consumes the bytes
// (the negotiation reader, then the reply parser) is plugged in with setSink.

/** Below this, a READ payload goes through the shared buffer and is copied. */
const DIRECT_MIN_BYTES = 16 * 1024;
const SHARED_BYTES = 256 * 1024;

export interface ReadSink {
  /** Bytes received: a view valid only during the call (copy what must be kept). */
  bytes(view: Buffer): void;
  /** Where the next bytes may go directly (the rest of a READ payload), if anywhere. */
  directTarget?(min: number): Uint8Array | undefined;
  /** `n` bytes arrived in the buffer directTarget returned. */
  advanceDirect?(n: number): void;
}

export class ReadRouter {
  private readonly shared = Buffer.allocUnsafe(SHARED_BYTES);
  private sink: ReadSink | undefined;
  private held: Buffer[] = [];
  private lastDirect: Uint8Array | undefined;

  /** The `onread` option of net.connect. */
  readonly onread = {
    buffer: (): Uint8Array => {
      const d = this.sink?.directTarget?.(DIRECT_MIN_BYTES);
      this.lastDirect = d;
      return d ?? this.shared;
    },
    // Returning false would pause the socket: this always goes on reading.
    callback: (n: number, buf: Uint8Array): boolean => {
      if (this.lastDirect !== undefined && buf === this.lastDirect) {
        this.lastDirect = undefined;
        this.sink!.advanceDirect!(n);
        return true;
      }
      const view = this.shared.subarray(0, n);
      if (this.sink) this.sink.bytes(view);
      else this.held.push(Buffer.from(view));
      return true;
    },
  };

  /** Plugs in the consumer (undefined: bytes are kept until one is plugged in). */
  setSink(sink: ReadSink | undefined): void {
    this.sink = sink;
    this.lastDirect = undefined;
    if (!sink) return;
    while (this.held.length > 0 && this.sink === sink) sink.bytes(this.held.shift()!);
  }
}
