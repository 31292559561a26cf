// The io_uring backend: raw io_uring_setup / io_uring_enter / io_uring_register through
// koffi; the SQ and CQ rings and the SQE array are mmap'd and written in place through
// typed-array views over koffi.view(); head/tail go through Atomics.
//
// Submission: requests issued in one JS turn are queued and written to the SQ once the
// turn's microtasks have all run (a microtask that queues a nextTick: Node runs the tick
// queue only after the microtask queue is empty), and handed to the kernel with one
// io_uring_enter. A plain microtask would flush at the depth of the first request, before
// the continuations deeper in the same turn have issued theirs. No event-loop turn is
// added, so a lone request waits no longer. A request to an O_DIRECT file is the exception:
// it goes to the kernel at once, alone (with whatever buffered requests wait), as QEMU's
// io_uring submits without a plug. The device then gets requests one by one as they are
// issued, not the turn's in a burst: a virtio disk (this machine's) answered bursts of a
// wake-up's worth of 4 KiB reads late, its first completion after its last. 4 KiB random
// reads at QD 32 against fio's io_uring, four alternated runs each: 0.72-0.77x batched,
// 0.93-1.02x at once, for 7-8 CPU µs per read instead of 4.5-5.3 (an enter each).
// (Groups of 4 once measured no gain; the first request of a turn at once and the rest
// batched measured 0.75-0.82x.) Never more requests
// in flight than the CQ holds (the rest wait in `pending`), so the CQ cannot overflow; if
// the kernel still reports an overflow, it is flushed with GETEVENTS.
//
// Completion: what the enter call already completed (page-cache hits complete inline) is
// reaped in a setImmediate, with no wake-up and no further syscall. Otherwise the one
// waiter is a uv_poll handle (koffi.node.poll) on the ring fd, watched by the event loop's
// own epoll: the ring fd becomes readable when CQEs are posted. It takes no libuv
// thread-pool thread, the event loop never blocks on it, and it is unref'd whenever
// nothing is in flight, so an idle engine does not keep the process alive.
//
// Setup flags: COOP_TASKRUN (no IPI; completions are posted when the JS thread next
// enters the kernel, which the sleeping event loop does at once since a task sleeping in
// epoll_wait is woken), SUBMIT_ALL, CLAMP, CQSIZE; any the kernel refuses is dropped and
// setup retried. Never SINGLE_ISSUER or DEFER_TASKRUN: with DEFER_TASKRUN completions are
// only posted when the submitting task calls io_uring_enter(GETEVENTS), and a poll on the
// ring fd would never fire.
import { CompletionPoller } from './completion-poller.ts';
import { EngineError, ErrorCode, IoError } from './errors.ts';
import { InlineIo } from './inline-io.ts';
import { BufferTable } from './io-uring-buffers.ts';
import {
  addressOf,
  closeFd,
  EAGAIN,
  EBUSY,
  EINTR,
  EINVAL,
  ioUringEnter,
  ioUringRegister,
  ioUringSetup,
  iovecs,
  mmap,
  munmap,
  view,
} from './native.ts';
import type { Backend, IoRequest } from './request.ts';
import { ThreadPoolBackend } from './threadpool.ts';

const SETUP_CQSIZE = 1 << 3;
const SETUP_CLAMP = 1 << 4;
const SETUP_SUBMIT_ALL = 1 << 7;
const SETUP_COOP_TASKRUN = 1 << 8;
const FEAT_SINGLE_MMAP = 1 << 0;
const ENTER_GETEVENTS = 1 << 0;
const SQ_CQ_OVERFLOW = 1 << 1;
const OFF_SQ_RING = 0;
const OFF_CQ_RING = 0x8000000;
const OFF_SQES = 0x10000000;
const REGISTER_PROBE = 8;
const OP_SUPPORTED = 1;

const OP_READV = 1;
const OP_WRITEV = 2;
const OP_FSYNC = 3;
const OP_READ_FIXED = 4;
const OP_WRITE_FIXED = 5;
const OP_FALLOCATE = 17;
const OP_READ = 22;
const OP_WRITE = 23;
const FSYNC_DATASYNC = 1;
/** sqe->flags IOSQE_ASYNC, in the SQE's first word (opcode u8, flags u8, ioprio u16). */
const SQE_ASYNC = (1 << 4) << 8;

const TWO32 = 4294967296;
/** The most one read/write attempt asks for (the SQE length is 32 bits); the rest of a
 * larger buffer is a continuation, like a short transfer. */
const MAX_ATTEMPT = 1 << 30;

export interface IoUringInfo {
  sqEntries: number;
  cqEntries: number;
  setupFlags: number;
  features: number;
  /** Opcodes the probe found supported, among those this backend uses. */
  ops: { read: boolean; write: boolean; fallocate: boolean; fixed: boolean };
  /** Whether a sparse registered-buffer table exists (arena slabs are registered into it
   * as long as the memlock limit allows; reads/writes into them use READ/WRITE_FIXED). */
  bufferTable: boolean;
  /** Arena slabs registered now (the table's count). */
  readonly registeredBuffers: number;
}

interface Mapping {
  addr: bigint;
  size: number;
}

export class IoUringBackend implements Backend {
  readonly name = 'io_uring' as const;
  readonly info: IoUringInfo;
  private readonly ringFd: number;
  private readonly maps: Mapping[];
  private sq: Uint32Array;
  private cq: Int32Array;
  private sqes: Uint32Array;
  private readonly sqHeadI: number;
  private readonly sqTailI: number;
  private readonly sqFlagsI: number;
  private readonly sqMask: number;
  private readonly sqEntries: number;
  private readonly cqHeadI: number;
  private readonly cqTailI: number;
  private readonly cqMask: number;
  private readonly cqesI: number;
  private sqTail: number;
  private readonly slots: (IoRequest | undefined)[];
  private readonly free: number[];
  private pending: IoRequest[] = [];
  private pendingHead = 0;
  private count = 0;
  private flushScheduled = false;
  private reapScheduled = false;
  private destroyed = false;
  private readonly poller: CompletionPoller;
  private readonly fallback = new ThreadPoolBackend();
  /** The registered-buffer table, where the kernel has one (io-uring-buffers.ts). */
  private readonly buffers: BufferTable | undefined;
  /** Reads/writes submitted as READ_FIXED/WRITE_FIXED. */
  fixedIos = 0;
  /** Requests submitted with IOSQE_ASYNC (buffered reads that always block). */
  asyncIos = 0;
  /** Small requests that would block, done with pread/pwrite instead (inline-io.ts). */
  private readonly inlineIo = new InlineIo();

  /** Requests done inline with pread/pwrite. */
  get inlineIos(): number {
    return this.inlineIo.inlineIos;
  }
  /** io_uring_enter calls that submitted (the cost the submission batching saves). */
  enters = 0;
  private readonly flushFn = (): void => this.flush();
  private readonly deferFlushFn = (): void => process.nextTick(this.flushFn);
  private readonly reapFn = (): void => {
    this.reapScheduled = false;
    this.reap();
  };

  /** Sets up a ring of `entries` SQEs (CQ twice that); throws an IoError if the kernel
   * refuses io_uring (ENOSYS, EPERM when disabled by sysctl, ENOMEM). */
  constructor(entries: number) {
    const params = new Uint8Array(120);
    const p32 = new Uint32Array(params.buffer);
    const attempts = [
      SETUP_CQSIZE | SETUP_CLAMP | SETUP_SUBMIT_ALL | SETUP_COOP_TASKRUN,
      SETUP_CQSIZE | SETUP_CLAMP | SETUP_SUBMIT_ALL,
      SETUP_CQSIZE | SETUP_CLAMP,
      0,
    ];
    let fd = -EINVAL;
    let flags = 0;
    for (flags of attempts) {
      params.fill(0);
      p32[2] = flags;
      p32[1] = entries * 2;
      fd = ioUringSetup(entries, params);
      if (fd >= 0 || fd !== -EINVAL) break;
    }
    if (fd < 0) throw new IoError(-fd, 'io_uring_setup');
    this.ringFd = fd;
    const sqEntries = p32[0]!;
    const cqEntries = p32[1]!;
    const features = p32[5]!;
    // struct io_sqring_offsets at byte 40, struct io_cqring_offsets at byte 80.
    const sqOff = {
      head: p32[10]!,
      tail: p32[11]!,
      mask: p32[12]!,
      flags: p32[14]!,
      array: p32[16]!,
    };
    const cqOff = { head: p32[20]!, tail: p32[21]!, mask: p32[22]!, cqes: p32[25]! };
    const sqSize = sqOff.array + sqEntries * 4;
    const cqSize = cqOff.cqes + cqEntries * 16;
    this.maps = [];
    try {
      let sqMap: Mapping;
      let cqMap: Mapping;
      if (features & FEAT_SINGLE_MMAP) {
        sqMap = this.map(Math.max(sqSize, cqSize), OFF_SQ_RING);
        cqMap = sqMap;
      } else {
        sqMap = this.map(sqSize, OFF_SQ_RING);
        cqMap = this.map(cqSize, OFF_CQ_RING);
      }
      const sqesMap = this.map(sqEntries * 64, OFF_SQES);
      this.sq = new Uint32Array(view(sqMap.addr, sqMap.size));
      this.cq = new Int32Array(view(cqMap.addr, cqMap.size));
      this.sqes = new Uint32Array(view(sqesMap.addr, sqesMap.size));
    } catch (err) {
      for (const m of this.maps) munmap(m.addr, m.size);
      closeFd(fd);
      throw err;
    }
    this.sqHeadI = sqOff.head >>> 2;
    this.sqTailI = sqOff.tail >>> 2;
    this.sqFlagsI = sqOff.flags >>> 2;
    this.sqMask = this.sq[sqOff.mask >>> 2]!;
    this.sqEntries = sqEntries;
    this.cqHeadI = cqOff.head >>> 2;
    this.cqTailI = cqOff.tail >>> 2;
    this.cqMask = this.cq[cqOff.mask >>> 2]!;
    this.cqesI = cqOff.cqes >>> 2;
    // The SQ index array maps ring position i to SQE i, once and for all.
    const arrayI = sqOff.array >>> 2;
    for (let i = 0; i < sqEntries; i++) this.sq[arrayI + i] = i;
    this.sqTail = Atomics.load(this.sq, this.sqTailI);
    this.slots = new Array(cqEntries).fill(undefined);
    this.free = [];
    for (let i = cqEntries - 1; i >= 0; i--) this.free.push(i);
    let ops: IoUringInfo['ops'];
    try {
      ops = this.probe();
    } catch (err) {
      this.unmapAndClose();
      throw err;
    }
    const buffers = ops.fixed ? BufferTable.create(fd) : undefined;
    this.buffers = buffers;
    this.info = {
      sqEntries,
      cqEntries,
      setupFlags: flags,
      features,
      ops,
      bufferTable: buffers !== undefined,
      get registeredBuffers() {
        return buffers?.count ?? 0;
      },
    };
    this.poller = new CompletionPoller(fd, () => this.reap());
  }

  private map(size: number, offset: number): Mapping {
    const addr = mmap(size, this.ringFd, offset);
    if (typeof addr === 'number') throw new IoError(-addr, 'mmap');
    const m = { addr, size };
    this.maps.push(m);
    return m;
  }

  private probe(): IoUringInfo['ops'] {
    // struct io_uring_probe: last_op u8, ops_len u8, resv u16, resv2 u32[3], then 256
    // struct io_uring_probe_op { op u8, resv u8, flags u16, resv2 u32 }.
    const buf = new Uint8Array(16 + 256 * 8);
    const r = ioUringRegister(this.ringFd, REGISTER_PROBE, buf, 256);
    if (r < 0) return { read: false, write: false, fallocate: false, fixed: false };
    const n = buf[1]!;
    const dv = new DataView(buf.buffer);
    const has = (op: number): boolean =>
      op < n && (dv.getUint16(16 + op * 8 + 2, true) & OP_SUPPORTED) !== 0;
    if (!has(OP_READV) || !has(OP_WRITEV) || !has(OP_FSYNC)) {
      throw new EngineError(
        ErrorCode.BACKEND_UNAVAILABLE,
        'io_uring: the kernel lacks READV/WRITEV/FSYNC',
      );
    }
    return {
      read: has(OP_READ),
      write: has(OP_WRITE),
      fallocate: has(OP_FALLOCATE),
      fixed: has(OP_READ_FIXED) && has(OP_WRITE_FIXED),
    };
  }

  /**
   * Registers `mem` (an arena slab) as a fixed buffer. Returns false where the table is
   * full, absent, or the memlock limit refuses it; the memory is then used through plain
   * READ/WRITE.
   */
  registerBuffer(mem: Uint8Array): boolean {
    return this.buffers?.register(mem) ?? false;
  }

  /** Unregisters a slab before the arena frees it (io-uring-buffers.ts). */
  unregisterBuffer(mem: Uint8Array): void {
    this.buffers?.unregister(mem);
  }

  get inFlight(): number {
    return (
      this.count +
      (this.pending.length - this.pendingHead) +
      this.inlineIo.pending +
      this.fallback.inFlight
    );
  }

  submit(req: IoRequest): void {
    if (req.kind === 'fallocate' && !this.info.ops.fallocate) {
      this.fallback.submit(req);
      return;
    }
    this.pending.push(req);
    if (req.align !== 0) this.flush();
    else this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(this.deferFlushFn);
    }
  }

  /** Writes queued requests into SQEs and submits them with one io_uring_enter. */
  private flush(): void {
    this.flushScheduled = false;
    if (this.destroyed) return;
    let queued = 0;
    while (this.pendingHead < this.pending.length && this.free.length > 0) {
      if ((this.sqTail - Atomics.load(this.sq, this.sqHeadI)) >>> 0 >= this.sqEntries) {
        if (!this.enter()) break;
        queued = 0;
        continue;
      }
      const req = this.pending[this.pendingHead]!;
      this.pending[this.pendingHead++] = undefined as unknown as IoRequest;
      if (this.inlineIo.take(req)) continue;
      const slot = this.free.pop()!;
      this.slots[slot] = req;
      this.count++;
      this.prep(req, slot, (this.sqTail & this.sqMask) << 4);
      this.sqTail = (this.sqTail + 1) >>> 0;
      queued++;
    }
    if (this.pendingHead === this.pending.length) {
      this.pending = [];
      this.pendingHead = 0;
    }
    if (queued > 0 || this.sqTail !== Atomics.load(this.sq, this.sqHeadI)) this.enter();
    this.updateRef();
  }

  /** Fills the SQE at word index `w` for the remaining part of `req`. */
  private prep(req: IoRequest, slot: number, w: number): void {
    const s = this.sqes;
    s.fill(0, w, w + 16);
    let op: number;
    let addr = 0;
    let len = 0;
    let off = req.position;
    switch (req.kind) {
      case 'read':
      case 'write': {
        const b = req.bufs[0]!;
        const useVec = req.kind === 'read' ? !this.info.ops.read : !this.info.ops.write;
        if (useVec) {
          op = req.kind === 'read' ? OP_READV : OP_WRITEV;
          addr = this.iovec(req);
          len = 1;
        } else {
          addr = addressOf(b);
          len = Math.min(b.byteLength, MAX_ATTEMPT);
          // A registered buffer goes as READ_FIXED/WRITE_FIXED, except as the source of a
          // buffered write: the kernel copies a fixed buffer into the page cache page by
          // page (a bvec, plain memcpy), slower than its copy from user memory. fio on ext4,
          // 1 MiB sequential writes at QD 32, medians of 12: 2.85 GB/s fixed, 3.54 GB/s not
          // (qcow2.bench.ts's allocating row: 0.86-1.08x -> 1.19-1.21x qemu-img bench).
          // Buffered reads into fixed buffers measured as fast or faster.
          const reg =
            req.kind === 'write' && req.align === 0 ? undefined : this.buffers?.lookup(b.buffer);
          if (reg !== undefined && addr >= reg.start && addr + len <= reg.end) {
            op = req.kind === 'read' ? OP_READ_FIXED : OP_WRITE_FIXED;
            s[w + 10] = reg.index; // buf_index
            this.fixedIos++;
          } else {
            op = req.kind === 'read' ? OP_READ : OP_WRITE;
          }
        }
        break;
      }
      case 'readv':
      case 'writev':
        op = req.kind === 'readv' ? OP_READV : OP_WRITEV;
        addr = this.iovec(req);
        len = req.bufs.length;
        break;
      case 'fsync':
      case 'fdatasync':
        op = OP_FSYNC;
        off = 0;
        s[w + 7] = req.kind === 'fdatasync' ? FSYNC_DATASYNC : 0;
        break;
      case 'fallocate':
        op = OP_FALLOCATE;
        addr = req.length;
        len = req.mode;
        break;
    }
    // A buffered read that would block anyway goes straight to io-wq (IOSQE_ASYNC): the
    // non-blocking attempt on the submitting thread only fails and copies the request's
    // state before the same punt. Measured on ext4 and tmpfs: about half the enters and
    // syscalls per request. Never a write: io-wq runs the writes to one regular file one
    // at a time (hashed by inode), but only when the file is known as the work is queued,
    // and a request forced async is queued before its file is looked up. Flagged, 32 large
    // writes to one file ran on as many workers, spinning on the inode lock ext4 and tmpfs
    // take for each buffered write (rwsem_spin_on_owner: ~11% of the CPU of a 1 MiB qcow2
    // allocating write bench, io-wq time per 256 MiB 105 -> 70 ms without the flag, the
    // bench 0.53x -> 0.77x qemu-img bench, which sends its writes the same unflagged way;
    // 0.70-0.86x -> 0.86-1.08x once the bench wrote from one buffer as qemu-img does).
    if (req.blocks && (req.kind === 'read' || req.kind === 'readv')) {
      op |= SQE_ASYNC;
      this.asyncIos++;
    }
    s[w] = op;
    s[w + 1] = req.fd;
    s[w + 2] = off >>> 0;
    s[w + 3] = (off / TWO32) >>> 0;
    s[w + 4] = addr >>> 0;
    s[w + 5] = (addr / TWO32) >>> 0;
    s[w + 6] = len;
    s[w + 8] = slot;
  }

  /** A struct iovec array for the remaining buffers, kept on the request until its
   * completion. */
  private iovec(req: IoRequest): number {
    req.iov = iovecs(req.bufs);
    return addressOf(req.iov);
  }

  /** Submits what the SQ holds. Returns false when the kernel could not take anything now
   * (EAGAIN/EBUSY: completions must be reaped first). */
  private enter(): boolean {
    Atomics.store(this.sq, this.sqTailI, this.sqTail);
    for (;;) {
      const toSubmit = (this.sqTail - Atomics.load(this.sq, this.sqHeadI)) >>> 0;
      if (toSubmit === 0) break;
      const r = ioUringEnter(this.ringFd, toSubmit, 0, 0);
      this.enters++;
      if (r >= 0) {
        if (r === 0) break;
        continue;
      }
      if (r === -EINTR) continue;
      if (r === -EAGAIN || r === -EBUSY) {
        this.scheduleReap();
        this.retryLater();
        return false;
      }
      this.failUnsubmitted(-r);
      break;
    }
    if (this.cqReady()) this.scheduleReap();
    return true;
  }

  private retryLater(): void {
    setImmediate(() => this.scheduleFlush());
  }

  /** io_uring_enter failed hard: take back the SQEs the kernel did not consume and fail
   * their requests (their slots are freed, their promises reject). */
  private failUnsubmitted(errno: number): void {
    const head = Atomics.load(this.sq, this.sqHeadI);
    const failed: IoRequest[] = [];
    for (let t = head; t !== this.sqTail; t = (t + 1) >>> 0) {
      const slot = this.sqes[((t & this.sqMask) << 4) + 8]!;
      const req = this.slots[slot];
      if (req) failed.push(req);
      this.slots[slot] = undefined;
      this.free.push(slot);
      this.count--;
    }
    this.sqTail = head;
    Atomics.store(this.sq, this.sqTailI, head);
    for (const req of failed) req.fail(errno, 'io_uring_enter');
  }

  private cqReady(): boolean {
    return Atomics.load(this.cq, this.cqTailI) !== Atomics.load(this.cq, this.cqHeadI);
  }

  private scheduleReap(): void {
    if (!this.reapScheduled) {
      this.reapScheduled = true;
      setImmediate(this.reapFn);
    }
  }

  /** Takes every CQE there is and completes its request. */
  private reap(): void {
    if (this.destroyed) return;
    const cq = this.cq;
    for (;;) {
      let head = Atomics.load(cq, this.cqHeadI);
      const tail = Atomics.load(cq, this.cqTailI);
      if (head === tail) {
        if (Atomics.load(this.sq, this.sqFlagsI) & SQ_CQ_OVERFLOW) {
          ioUringEnter(this.ringFd, 0, 0, ENTER_GETEVENTS);
          if (this.cqReady()) continue;
        }
        break;
      }
      const done: IoRequest[] = [];
      const results: number[] = [];
      while (head !== tail) {
        const base = this.cqesI + ((head & this.cqMask) << 2);
        const slot = cq[base]!;
        const res = cq[base + 2]!;
        head = (head + 1) | 0;
        const req = this.slots[slot];
        if (req === undefined) continue;
        this.slots[slot] = undefined;
        this.free.push(slot);
        this.count--;
        done.push(req);
        results.push(res);
      }
      Atomics.store(cq, this.cqHeadI, head);
      for (let i = 0; i < done.length; i++) done[i]!.complete(results[i]!);
    }
    if (this.pendingHead < this.pending.length && !this.flushScheduled) this.flush();
    else this.updateRef();
  }

  private updateRef(): void {
    this.poller.setBusy(this.count > 0);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.poller.close();
    this.unmapAndClose();
  }

  private unmapAndClose(): void {
    // Drop the views before the memory under them goes away.
    this.sq = new Uint32Array(0);
    this.cq = new Int32Array(0);
    this.sqes = new Uint32Array(0);
    for (const m of this.maps) munmap(m.addr, m.size);
    this.maps.length = 0;
    closeFd(this.ringFd);
  }
}
