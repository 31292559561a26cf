// One I/O request as the backends see it, and the rules every backend shares for a
// completion: short transfers are continued (offset forward, remaining length smaller),
// EOF ends a read, EINTR/EAGAIN/ECANCELED are retried, anything else is an IoError.
import { IoError } from './errors.ts';
import { EAGAIN, ECANCELED, EINTR } from './native.ts';

/** Errors that say the attempt did not happen, not that the I/O failed. ECANCELED: the engine
 * never cancels a request itself, but io-wq ends a request it was running with it when its
 * worker thread is interrupted (seen with `strace -f` attached to the daemon). */
const RETRIED = new Set([EINTR, EAGAIN, ECANCELED]);

export type OpKind = 'read' | 'write' | 'readv' | 'writev' | 'fsync' | 'fdatasync' | 'fallocate';

/** What a backend runs. Preconditions (checked by the engine, not re-checked here): the
 * file is open and not closing, buffers are non-empty, offset and buffers are aligned for
 * O_DIRECT files, the engine is open. */
export interface Backend {
  readonly name: 'io_uring' | 'aio' | 'threadpool';
  /** Starts (or restarts, for the remainder) `req`; ends with `req.complete(res)`, never
   * synchronously from submit. */
  submit(req: IoRequest): void;
  /** Requests submitted and not yet completed. */
  readonly inFlight: number;
  /** Releases kernel objects. Called once, after in-flight work has drained. */
  destroy(): void;
}

const MAX_RETRIES = 1000;

export class IoRequest {
  readonly kind: OpKind;
  readonly fd: number;
  /** The O_DIRECT alignment of the file, 0 for a buffered file. */
  readonly align: number;
  readonly path: string;
  /** Offset of the whole request. */
  readonly offset: number;
  /** Bytes of the whole request (fallocate: the range length). */
  readonly length: number;
  /** The buffers of the remaining part (read/write: one). Kept here so that they stay
   * reachable until the kernel is done with them. */
  bufs: Uint8Array[];
  /** fallocate mode. */
  readonly mode: number;
  /** Bytes transferred so far. */
  done = 0;
  retries = 0;
  /** A buffered read or write that always blocks in the kernel (see bufferedIoBlocks):
   * small ones are done inline (inline-io.ts); io_uring sends the reads straight to a
   * worker. */
  blocks = false;
  /** Backend-private: iovec array of the current attempt, kept alive until completion. */
  iov: Uint32Array | null = null;
  private readonly resolve: (n: number) => void;
  private readonly reject: (e: Error) => void;
  private readonly backend: Backend;
  private readonly onSettled: (req: IoRequest) => void;

  constructor(
    backend: Backend,
    kind: OpKind,
    fd: number,
    path: string,
    align: number,
    offset: number,
    bufs: Uint8Array[],
    length: number,
    mode: number,
    resolve: (n: number) => void,
    reject: (e: Error) => void,
    onSettled: (req: IoRequest) => void,
  ) {
    this.backend = backend;
    this.kind = kind;
    this.fd = fd;
    this.path = path;
    this.align = align;
    this.offset = offset;
    this.bufs = bufs;
    this.length = length;
    this.mode = mode;
    this.resolve = resolve;
    this.reject = reject;
    this.onSettled = onSettled;
  }

  /** Offset of the remaining part. */
  get position(): number {
    return this.offset + this.done;
  }

  /** Bytes of the remaining part. */
  get remaining(): number {
    return this.length - this.done;
  }

  get isTransfer(): boolean {
    return (
      this.kind === 'read' ||
      this.kind === 'write' ||
      this.kind === 'readv' ||
      this.kind === 'writev'
    );
  }

  get isRead(): boolean {
    return this.kind === 'read' || this.kind === 'readv';
  }

  /** A completion of the current attempt: `res` is bytes transferred (or 0) or -errno. */
  complete(res: number): void {
    this.iov = null;
    if (res < 0) {
      const errno = -res;
      if (RETRIED.has(errno) && this.retries++ < MAX_RETRIES) {
        this.start();
        return;
      }
      this.fail(errno);
      return;
    }
    if (!this.isTransfer) {
      this.succeed(0);
      return;
    }
    if (res === 0) {
      // EOF for a read; a write that makes no progress would loop forever: an error.
      if (this.isRead) this.succeed(this.done);
      else this.fail(5);
      return;
    }
    this.done += res;
    if (this.done >= this.length) {
      this.succeed(this.done);
      return;
    }
    // A short O_DIRECT read that leaves an unaligned remainder ends at EOF.
    if (this.align > 0 && this.isRead && res % this.align !== 0) {
      this.succeed(this.done);
      return;
    }
    this.advance(res);
    this.start();
  }

  /** Starts the request (or its remainder); a backend that throws instead of starting it
   * fails the request, which still settles exactly once. */
  start(): void {
    try {
      this.backend.submit(this);
    } catch (err) {
      this.failWith(err instanceof Error ? err : new Error(String(err)));
    }
  }

  /** Drops `n` bytes from the front of the remaining buffers (subtracting, not adding). */
  private advance(n: number): void {
    const rest: Uint8Array[] = [];
    let skip = n;
    for (const b of this.bufs) {
      if (skip >= b.byteLength) {
        skip -= b.byteLength;
        continue;
      }
      rest.push(skip > 0 ? b.subarray(skip) : b);
      skip = 0;
    }
    this.bufs = rest;
  }

  fail(errno: number, syscall: string = this.kind): void {
    const details: { path: string; offset?: number; length?: number } = { path: this.path };
    if (this.isTransfer || this.kind === 'fallocate') {
      details.offset = this.offset;
      details.length = this.length;
    }
    this.failWith(new IoError(errno, syscall, details));
  }

  failWith(err: Error): void {
    this.onSettled(this);
    this.reject(err);
  }

  private succeed(n: number): void {
    this.onSettled(this);
    this.resolve(n);
  }
}
