// libc entry points through koffi (no C addon), and the helpers the backends share.
// Raw `syscall()` returns -1 and sets errno; every wrapper here turns that into -errno so
// that callers compare with negative errno values (the io-engine crate's EINTR check,
// which compared -1 with -EINTR, never matched).
import koffi from 'koffi';
import { IoError } from './errors.ts';

const libc = koffi.load('libc.so.6');

/** x86_64 syscall numbers. */
export const SYS = {
  io_setup: 206,
  io_destroy: 207,
  io_getevents: 208,
  io_submit: 209,
  io_uring_setup: 425,
  io_uring_enter: 426,
  io_uring_register: 427,
  fcntl: 72,
} as const;

export const EINTR = 4;
export const EAGAIN = 11;
export const EBADF = 9;
export const EINVAL = 22;
export const ENXIO = 6;
export const EOPNOTSUPP = 95;
export const ENOSYS = 38;
export const EBUSY = 16;
export const ECANCELED = 125;

type Ptr = bigint | number | Uint8Array | ArrayBufferView | null;

// One declaration of `syscall` per shape we use: fixed prototypes over the variadic symbol
// (x86_64 glibc's syscall() is assembly that reads the registers, so this is safe).
const syscall2p = libc.func('syscall', 'long', ['long', 'long', 'void *']);
const syscall4p = libc.func('syscall', 'long', ['long', 'long', 'long', 'void *', 'long']);
const syscallEnter = libc.func('syscall', 'long', [
  'long',
  'int',
  'uint',
  'uint',
  'uint',
  'void *',
  'size_t',
]);
const syscallSubmit = libc.func('syscall', 'long', ['long', 'uint64_t', 'long', 'void *']);
const syscallGetevents = libc.func('syscall', 'long', [
  'long',
  'uint64_t',
  'long',
  'long',
  'void *',
  'void *',
]);
const syscallDestroy = libc.func('syscall', 'long', ['long', 'uint64_t']);

const mmapFn = libc.func(
  'void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)',
);
const munmapFn = libc.func('int munmap(void *addr, size_t length)');
const closeFn = libc.func('int close(int fd)');
const fcntlInt = libc.func('int fcntl(int fd, int cmd, int arg)');
const F_DUPFD_CLOEXEC = 1030;
const eventfdFn = libc.func('int eventfd(uint initval, int flags)');
const pipe2Fn = libc.func('int pipe2(_Out_ int *fds, int flags)');
const readFn = libc.func('long read(int fd, void *buf, size_t count)');
const writeFn = libc.func('long write(int fd, void *buf, size_t count)');
const lseekFn = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
const preadFn = libc.func('long pread(int fd, void *buf, size_t count, int64_t offset)');
const pwriteFn = libc.func('long pwrite(int fd, void *buf, size_t count, int64_t offset)');
const fallocateFn = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const copyFileRangeFn = libc.func(
  'long copy_file_range(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, uint flags)',
);
const statxFn = libc.func(
  'int statx(int dirfd, const char *path, int flags, uint mask, void *buf)',
);
const ioctlIntFn = libc.func('ioctl', 'int', ['int', 'ulong', 'void *']);
const malloptFn = libc.func('int mallopt(int param, int value)');
/** glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, and the default of both. */
const M_TRIM_THRESHOLD = -1;
const M_MMAP_THRESHOLD = -3;
const MALLOC_DEFAULT_THRESHOLD = 128 * 1024;

/**
 * Fixes glibc's mmap threshold at `bytes` (128 KiB is its default): blocks that large are
 * mapped on their own and unmapped when freed. Left to itself, glibc raises the threshold
 * to the size of the largest block freed so far (up to 32 MiB), after which such blocks
 * come from the heap, and freed ones stay resident below any block still in use there:
 * after a burst of large buffers the process would keep their memory. For the whole
 * process; false where the C library has no mallopt (not glibc).
 *
 * A threshold above the default also sets the trim threshold to twice it, as glibc does
 * when it raises the mmap threshold itself: fixing one leaves the other at 128 KiB, so that
 * every heap block above that freed at the top of the heap gave its pages back and the
 * next one faulted them in again (librbd's 1 MiB write copies: a fault per page, and
 * slower copies of those pages on its messenger thread).
 */
export function setMallocMmapThreshold(bytes = MALLOC_DEFAULT_THRESHOLD): boolean {
  try {
    const trim = bytes > MALLOC_DEFAULT_THRESHOLD ? 2 * bytes : MALLOC_DEFAULT_THRESHOLD;
    return malloptFn(M_MMAP_THRESHOLD, bytes) === 1 && malloptFn(M_TRIM_THRESHOLD, trim) === 1;
  } catch {
    return false;
  }
}

/** A libc call's result: -1 becomes -errno. */
export function ret(r: number | bigint): number {
  const n = Number(r);
  return n === -1 ? -koffi.errno() : n;
}

/** The address of a view's first byte (the view's own address, byteOffset included). */
export function addressOf(view: ArrayBufferView): number {
  return Number(koffi.address(view));
}

/** A struct iovec array for `bufs` (64-bit base and length each, as little-endian words). */
export function iovecs(bufs: readonly Uint8Array[]): Uint32Array {
  const iov = new Uint32Array(bufs.length * 4);
  for (let i = 0; i < bufs.length; i++) {
    const b = bufs[i]!;
    const a = addressOf(b);
    iov[i * 4] = a >>> 0;
    iov[i * 4 + 1] = (a / 2 ** 32) >>> 0;
    iov[i * 4 + 2] = b.byteLength >>> 0;
    iov[i * 4 + 3] = (b.byteLength / 2 ** 32) >>> 0;
  }
  return iov;
}

export function ioUringSetup(entries: number, params: Uint8Array): number {
  return ret(syscall2p(SYS.io_uring_setup, entries, params));
}

export function ioUringEnter(
  fd: number,
  toSubmit: number,
  minComplete: number,
  flags: number,
): number {
  return ret(syscallEnter(SYS.io_uring_enter, fd, toSubmit, minComplete, flags, null, 0));
}

export function ioUringRegister(fd: number, opcode: number, arg: Ptr, nrArgs: number): number {
  return ret(syscall4p(SYS.io_uring_register, fd, opcode, arg, nrArgs));
}

export function ioSetup(nr: number, ctxOut: BigUint64Array): number {
  return ret(syscall2p(SYS.io_setup, nr, ctxOut));
}

export function ioDestroy(ctx: bigint): number {
  return ret(syscallDestroy(SYS.io_destroy, ctx));
}

export function ioSubmit(ctx: bigint, nr: number, iocbpp: ArrayBufferView): number {
  return ret(syscallSubmit(SYS.io_submit, ctx, nr, iocbpp));
}

export function ioGetevents(
  ctx: bigint,
  minNr: number,
  nr: number,
  events: ArrayBufferView,
  timeout: ArrayBufferView | null,
): number {
  return ret(syscallGetevents(SYS.io_getevents, ctx, minNr, nr, events, timeout));
}

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_POPULATE = 0x8000;

/** mmap a shared mapping of `fd`; returns the address, or -errno. */
export function mmap(length: number, fd: number, offset: number): bigint | number {
  const p = mmapFn(null, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, offset) as
    | bigint
    | null;
  if (p === null || BigInt.asIntN(64, BigInt(p)) === -1n) return -koffi.errno();
  return BigInt(p);
}

export function munmap(addr: bigint, length: number): number {
  return ret(munmapFn(addr, length));
}

/** An ArrayBuffer over native memory (valid until that memory is unmapped). */
export function view(addr: bigint, length: number): ArrayBuffer {
  return koffi.view(addr, length);
}

export function closeFd(fd: number): number {
  return ret(closeFn(fd));
}

export const EFD_NONBLOCK = 0x800;
export const EFD_CLOEXEC = 0x80000;

/** O_NONBLOCK and O_CLOEXEC for pipe2 (the same bits as eventfd's). */
export const O_NONBLOCK = EFD_NONBLOCK;
export const O_CLOEXEC = EFD_CLOEXEC;

/** pipe2(2): [read end, write end], or -errno. */
export function pipe(flags: number): [number, number] | number {
  const fds = [0, 0];
  const r = ret(pipe2Fn(fds, flags));
  return r < 0 ? r : [fds[0]!, fds[1]!];
}

export function eventfd(flags: number): number {
  return ret(eventfdFn(0, flags));
}

const eventfdScratch = new BigUint64Array(1);
/** Reads (clears) a non-blocking eventfd; returns the count, or -errno (-EAGAIN: empty). */
export function eventfdRead(fd: number): number {
  const r = ret(readFn(fd, eventfdScratch, 8));
  return r < 0 ? r : Number(eventfdScratch[0]);
}

export function eventfdWrite(fd: number, value: number): number {
  return ret(writeFn(fd, new BigUint64Array([BigInt(value)]), 8));
}

export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** pread(2) on this thread: bytes read or -errno. */
export function pread(fd: number, buf: Uint8Array, offset: number): number {
  return ret(preadFn(fd, buf, buf.byteLength, offset));
}

/** pwrite(2) on this thread: bytes written or -errno. */
export function pwrite(fd: number, buf: Uint8Array, offset: number): number {
  return ret(pwriteFn(fd, buf, buf.byteLength, offset));
}

export function lseek(fd: number, offset: number, whence: number): number {
  return ret(lseekFn(fd, offset, whence));
}

// koffi runs `.async` calls on the libuv thread pool and refuses more than a fixed number
// running at once ("Too many asynchronous calls are running"): the calls below queue
// for one of MAX_ASYNC_CALLS slots instead, so that no caller ever sees that refusal.
// Each call running takes one of koffi's memory pools (a stack and a heap of 128 KiB),
// of which it keeps 8 (resident_async_pools); a call beyond them mapped a pool and
// unmapped it again (glibc maps blocks of 128 KiB and more: serve fixes its threshold),
// which 16 copies in flight paid on 8 of every 16 calls. The libuv pool runs 4 calls at
// a time anyway: more waiting in koffi's queue than here gains nothing.
const MAX_ASYNC_CALLS = 8;
let asyncRunning = 0;
const asyncWaiting: (() => void)[] = [];

/** Runs `call(done)` (a koffi async call) once a slot is free; resolves what done gives. */
function inAsyncSlot(call: (done: (value: number) => void) => void): Promise<number> {
  return new Promise((resolve) => {
    const start = () => {
      asyncRunning++;
      call((value) => {
        asyncRunning--;
        asyncWaiting.shift()?.();
        resolve(value);
      });
    };
    if (asyncRunning < MAX_ASYNC_CALLS) start();
    else asyncWaiting.push(start);
  });
}

/** lseek on a libuv thread-pool thread (SEEK_DATA/SEEK_HOLE may read metadata). */
export function lseekAsync(fd: number, offset: number, whence: number): Promise<number> {
  return inAsyncSlot((done) =>
    lseekFn.async(fd, offset, whence, (err: unknown, r: number | bigint) => {
      done(err ? -EINVAL : ret(r));
    }),
  );
}

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** fallocate on a libuv thread-pool thread; resolves 0 or -errno. */
export function fallocateAsync(
  fd: number,
  mode: number,
  offset: number,
  length: number,
): Promise<number> {
  return inAsyncSlot((done) =>
    fallocateFn.async(fd, mode, offset, length, (err: unknown, r: number) => {
      done(err ? -EINVAL : ret(r));
    }),
  );
}

/**
 * copy_file_range on a libuv thread-pool thread: up to `length` bytes of `fdIn` at `offIn`
 * to `fdOut` at `offOut`, in the kernel (one copy in the page cache, or none where the file
 * system shares extents); resolves the bytes copied (0 at the end of fdIn) or -errno.
 */
export function copyFileRangeAsync(
  fdIn: number,
  offIn: number,
  fdOut: number,
  offOut: number,
  length: number,
): Promise<number> {
  // loff_t in and out: the kernel advances them; the arrays live until the call returns.
  const offs = new BigInt64Array([BigInt(offIn), BigInt(offOut)]);
  return inAsyncSlot((done) =>
    copyFileRangeFn.async(
      fdIn,
      offs.subarray(0, 1),
      fdOut,
      offs.subarray(1, 2),
      length,
      0,
      (err: unknown, r: number | bigint) => {
        done(err ? -EINVAL : ret(r));
      },
    ),
  );
}

const AT_EMPTY_PATH = 0x1000;
const STATX_TYPE = 0x1;
const STATX_DIOALIGN = 0x2000;
const S_IFMT = 0o170000;
const S_IFBLK = 0o060000;
const BLKSSZGET = 0x1268;

/**
 * The alignment O_DIRECT needs on `fd` (offset, length and buffer address): the logical
 * block size of a block device, statx's DIO alignment of a file (Linux >= 6.1), else 4096.
 */
export function directAlignment(fd: number): number {
  const buf = new Uint8Array(256);
  const dv = new DataView(buf.buffer);
  if (ret(statxFn(fd, '', AT_EMPTY_PATH, STATX_TYPE | STATX_DIOALIGN, buf)) === 0) {
    const mask = dv.getUint32(0, true);
    const mode = dv.getUint16(28, true);
    if ((mode & S_IFMT) === S_IFBLK) {
      const out = new Int32Array(1);
      if (ret(ioctlIntFn(fd, BLKSSZGET, out)) === 0 && out[0]! > 0) return out[0]!;
    }
    if (mask & STATX_DIOALIGN) {
      const memAlign = dv.getUint32(152, true);
      const offsetAlign = dv.getUint32(156, true);
      const a = Math.max(memAlign, offsetAlign);
      if (a > 0) return a;
    }
  }
  return 4096;
}

const fstatfsFn = libc.func('int fstatfs(int fd, void *buf)');
const S_IFREG = 0o100000;
const EXT4_SUPER_MAGIC = 0xef53;
const XFS_SUPER_MAGIC = 0x58465342;
const BTRFS_SUPER_MAGIC = 0x9123683e;
const TMPFS_MAGIC = 0x01021994;
/** Filesystems whose SEEK_DATA/SEEK_HOLE look the offset up in an extent tree. */
const EXTENT_SEEK = new Set([EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC]);

/** Which requests to a file always block in the kernel (see bufferedIoBlocks). */
export interface BlockingIo {
  reads: boolean;
  writes: boolean;
  /**
   * SEEK_DATA/SEEK_HOLE may take long: on tmpfs they walk the page cache, on a network or
   * FUSE filesystem they ask a server; false where they look an extent tree up (ext4, XFS,
   * btrfs), which QEMU's file driver does on its event loop, and on other kinds of file.
   */
  seeks: boolean;
}

/**
 * Which buffered requests to `fd` always block, so that io_uring's non-blocking attempt
 * on the submitting thread only fails before it hands them to an io-wq worker: on a regular
 * file, writes where the filesystem lacks non-blocking buffered writes (Linux 6.18: ext2/3/4
 * and tmpfs lack FOP_BUFFER_WASYNC; XFS and btrfs have it), and reads where it also lacks
 * non-blocking buffered reads (tmpfs: FOP_BUFFER_RASYNC). Counted with the
 * io_uring:io_uring_queue_async_work tracepoint: one per such request.
 */
export function bufferedIoBlocks(fd: number): BlockingIo {
  const none = { reads: false, writes: false, seeks: false };
  const stx = new Uint8Array(256);
  if (ret(statxFn(fd, '', AT_EMPTY_PATH, STATX_TYPE, stx)) !== 0) return none;
  if ((new DataView(stx.buffer).getUint16(28, true) & S_IFMT) !== S_IFREG) return none;
  // struct statfs on x86_64: f_type is the first field (a long).
  const st = new BigInt64Array(16);
  if (ret(fstatfsFn(fd, st)) !== 0) return none;
  const type = Number(st[0]!);
  return {
    reads: type === TMPFS_MAGIC,
    writes: type === EXT4_SUPER_MAGIC || type === TMPFS_MAGIC,
    seeks: !EXTENT_SEEK.has(type),
  };
}

// Open file description locks (fcntl F_OFD_*): byte-range locks owned by the open file, not
// the process, so two opens of one file in one process conflict as two processes do, and
// closing another fd of the file does not drop them. They are what QEMU's image locking uses.
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;

// struct flock on x86_64: short l_type, short l_whence, (pad), off_t l_start, off_t l_len,
// pid_t l_pid (must be 0 for OFD locks), (pad): 32 bytes.
const flock = new Uint8Array(32);
const flockView = new DataView(flock.buffer);

function setFlock(type: number, start: number, length: number): void {
  flock.fill(0);
  flockView.setInt16(0, type, true);
  flockView.setInt16(2, 0, true); // SEEK_SET
  flockView.setBigInt64(8, BigInt(start), true);
  flockView.setBigInt64(16, BigInt(length), true);
}

/** F_OFD_SETLK (never waits): 0, or -errno (-EAGAIN: another open file holds a conflicting lock). */
export function ofdSetLock(fd: number, type: number, start: number, length: number): number {
  setFlock(type, start, length);
  return ret(syscall4p(SYS.fcntl, fd, F_OFD_SETLK, flock, 0));
}

/**
 * F_OFD_GETLK: the type of a lock another open file holds that would conflict with taking
 * `type` on the range (F_UNLCK: none), or -errno.
 */
export function ofdGetLock(fd: number, type: number, start: number, length: number): number {
  setFlock(type, start, length);
  const r = ret(syscall4p(SYS.fcntl, fd, F_OFD_GETLK, flock, 0));
  return r < 0 ? r : flockView.getInt16(0, true);
}

/**
 * dup(2) with close-on-exec: a second descriptor of the same open file, e.g. a socket's
 * for another thread while the first is closed. An IoError when it fails.
 */
export function dupFd(fd: number): number {
  const r = ret(fcntlInt(fd, F_DUPFD_CLOEXEC, 0));
  if (r < 0) throw new IoError(-r, 'fcntl');
  return r;
}
