// The Linux AIO backend: io_setup / io_submit / io_getevents through koffi. Truly
// asynchronous for O_DIRECT files. Buffered files are submitted with RWF_NOWAIT: a
// page-cache hit completes at once, and what would block (-EAGAIN, or -EOPNOTSUPP where
// the file cannot do NOWAIT) goes to the thread pool instead of blocking the event loop in
// io_submit. fsync, fdatasync and fallocate always go to the thread pool (libuv's, which
// exists from the start: nothing is ever dropped for want of a worker).
//
// Completion notification: every iocb carries IOCB_FLAG_RESFD with one eventfd, watched by
// a uv_poll handle on the event loop (koffi.node.poll): no thread-pool thread is taken,
// and the handle is unref'd while nothing is in flight.
//
// Unlike the io-engine crate's driver: a short transfer is continued with the remaining
// length made smaller (IoRequest.complete), errno comes back as -errno (native.ts), and a
// failed io_submit frees the slots of what it did not take and completes or requeues those
// requests.
import { CompletionPoller } from './completion-poller.ts';
import { IoError } from './errors.ts';
import {
  addressOf,
  closeFd,
  EAGAIN,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  EINTR,
  EOPNOTSUPP,
  eventfd,
  eventfdRead,
  ioDestroy,
  ioGetevents,
  ioSetup,
  ioSubmit,
  iovecs,
} from './native.ts';
import type { Backend, IoRequest } from './request.ts';
import { ThreadPoolBackend } from './threadpool.ts';

const IOCB_CMD_PREAD = 0;
const IOCB_CMD_PWRITE = 1;
const IOCB_CMD_PREADV = 7;
const IOCB_CMD_PWRITEV = 8;
const IOCB_FLAG_RESFD = 1;
const RWF_NOWAIT = 0x8;
const TWO32 = 4294967296;
/** The most one attempt asks for (a result must fit the int32 we read); the rest of a
 * larger buffer is a continuation, like a short transfer. */
const MAX_ATTEMPT = 1 << 30;

export class AioBackend implements Backend {
  readonly name = 'aio' as const;
  private readonly ctx: bigint;
  private readonly nr: number;
  private readonly efd: number;
  /** nr struct iocb (64 bytes each), in memory that never moves. */
  private readonly iocbs: Uint32Array;
  private readonly iocbAddr: number;
  /** The struct iocb * array given to io_submit. */
  private readonly iocbpp: Uint32Array;
  /** nr struct io_event (32 bytes each). */
  private readonly events: Int32Array;
  private readonly zeroTimeout = new BigInt64Array(2);
  private readonly slots: (IoRequest | undefined)[];
  private readonly nowait: boolean[];
  private readonly free: number[] = [];
  private pending: IoRequest[] = [];
  private count = 0;
  private flushScheduled = false;
  private reapScheduled = false;
  private destroyed = false;
  private readonly poller: CompletionPoller;
  private readonly fallback = new ThreadPoolBackend();
  /** Buffered reads/writes that RWF_NOWAIT sent to the thread pool (they would block). */
  nowaitFallbacks = 0;
  private readonly flushFn = (): void => this.flush();
  private readonly reapFn = (): void => {
    this.reapScheduled = false;
    this.reap();
  };

  constructor(nr: number) {
    const ctxOut = new BigUint64Array(1);
    const r = ioSetup(nr, ctxOut);
    if (r < 0) throw new IoError(-r, 'io_setup');
    this.ctx = ctxOut[0]!;
    const efd = eventfd(EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) {
      ioDestroy(this.ctx);
      throw new IoError(-efd, 'eventfd');
    }
    this.efd = efd;
    this.nr = nr;
    this.iocbs = new Uint32Array(nr * 16);
    this.iocbAddr = addressOf(this.iocbs);
    this.iocbpp = new Uint32Array(nr * 2);
    this.events = new Int32Array(nr * 8);
    this.slots = new Array(nr).fill(undefined);
    this.nowait = new Array(nr).fill(false);
    for (let i = nr - 1; i >= 0; i--) this.free.push(i);
    this.poller = new CompletionPoller(efd, () => this.reap());
  }

  get inFlight(): number {
    return this.count + this.pending.length + this.fallback.inFlight;
  }

  submit(req: IoRequest): void {
    if (!req.isTransfer) {
      this.fallback.submit(req);
      return;
    }
    this.pending.push(req);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(this.flushFn);
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.destroyed) return;
    while (this.pending.length > 0 && this.free.length > 0) {
      const n = Math.min(this.pending.length, this.free.length);
      const batch = this.pending.splice(0, n);
      const batchSlots: number[] = [];
      for (let i = 0; i < n; i++) {
        const req = batch[i]!;
        const slot = this.free.pop()!;
        this.slots[slot] = req;
        this.count++;
        this.prep(req, slot);
        const a = this.iocbAddr + slot * 64;
        this.iocbpp[i * 2] = a >>> 0;
        this.iocbpp[i * 2 + 1] = (a / TWO32) >>> 0;
        batchSlots.push(slot);
      }
      if (!this.submitBatch(batchSlots)) break;
    }
    this.scheduleReap();
    this.updateRef();
  }

  /** io_submit until the kernel took the batch. Returns false if it must wait (EAGAIN:
   * the rest went back to the front of `pending`). */
  private submitBatch(batchSlots: number[]): boolean {
    const n = batchSlots.length;
    let i = 0;
    while (i < n) {
      const r = ioSubmit(this.ctx, n - i, i === 0 ? this.iocbpp : this.iocbpp.subarray(i * 2));
      if (r > 0) {
        i += r;
        continue;
      }
      if (r === -EINTR) continue;
      if (r === -EAGAIN || r === 0) {
        // Out of resources: give the slots back, requeue in order, retry after a reap.
        const back: IoRequest[] = [];
        for (let j = i; j < n; j++) back.push(this.take(batchSlots[j]!));
        this.pending.unshift(...back);
        this.retryLater();
        return false;
      }
      // The first iocb of the rest was refused: complete it, go on with the others.
      const slot = batchSlots[i]!;
      const nowait = this.nowait[slot]!;
      const req = this.take(slot);
      i++;
      if (nowait && r === -EOPNOTSUPP) this.toThreadPool(req);
      else req.fail(-r);
    }
    return true;
  }

  private toThreadPool(req: IoRequest): void {
    this.nowaitFallbacks++;
    this.fallback.submit(req);
  }

  private take(slot: number): IoRequest {
    const req = this.slots[slot]!;
    this.slots[slot] = undefined;
    this.free.push(slot);
    this.count--;
    return req;
  }

  private retryLater(): void {
    setImmediate(() => {
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        queueMicrotask(this.flushFn);
      }
    });
  }

  private prep(req: IoRequest, slot: number): void {
    const c = this.iocbs;
    const w = slot * 16;
    c.fill(0, w, w + 16);
    let op: number;
    let addr: number;
    let len: number;
    if (req.kind === 'read' || req.kind === 'write') {
      const b = req.bufs[0]!;
      op = req.kind === 'read' ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
      addr = addressOf(b);
      len = Math.min(b.byteLength, MAX_ATTEMPT);
    } else {
      op = req.kind === 'readv' ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
      req.iov = iovecs(req.bufs);
      addr = addressOf(req.iov);
      len = req.bufs.length;
    }
    const nowait = req.align === 0;
    this.nowait[slot] = nowait;
    const off = req.position;
    c[w] = slot; // aio_data
    c[w + 3] = nowait ? RWF_NOWAIT : 0; // aio_rw_flags
    c[w + 4] = op; // aio_lio_opcode, aio_reqprio 0
    c[w + 5] = req.fd;
    c[w + 6] = addr >>> 0;
    c[w + 7] = (addr / TWO32) >>> 0;
    c[w + 8] = len;
    c[w + 10] = off >>> 0;
    c[w + 11] = (off / TWO32) >>> 0;
    c[w + 14] = IOCB_FLAG_RESFD;
    c[w + 15] = this.efd;
  }

  private scheduleReap(): void {
    if (!this.reapScheduled && this.count > 0) {
      this.reapScheduled = true;
      setImmediate(this.reapFn);
    }
  }

  private reap(): void {
    if (this.destroyed) return;
    eventfdRead(this.efd);
    const ev = this.events;
    for (;;) {
      const r = ioGetevents(this.ctx, 0, this.nr, ev, this.zeroTimeout);
      if (r === -EINTR) continue;
      if (r <= 0) break;
      for (let i = 0; i < r; i++) {
        const slot = ev[i * 8]!;
        const res = ev[i * 8 + 4]!;
        const nowait = this.nowait[slot]!;
        const req = this.take(slot);
        if (nowait && (res === -EAGAIN || res === -EOPNOTSUPP)) this.toThreadPool(req);
        else req.complete(res);
      }
      if (r < this.nr) break;
    }
    if (this.pending.length > 0 && !this.flushScheduled) this.flush();
    else this.updateRef();
  }

  private updateRef(): void {
    this.poller.setBusy(this.count > 0);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.poller.close();
    ioDestroy(this.ctx);
    closeFd(this.efd);
  }
}
