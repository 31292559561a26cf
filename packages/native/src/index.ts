// The libc calls vm-disk's packages share, through koffi (no C addon), loaded once. Every
// wrapper returns -errno on failure (never -1 with errno aside), so callers compare with
// negative errno values, and each package makes its own errors of them.
import koffi, { type node } from 'koffi';

/** glibc, for the calls a package declares itself (`libc.func(...)`). */
export const libc = koffi.load('libc.so.6');

const closeFn = libc.func('int close(int fd)');
const readFn = libc.func('long read(int fd, void *buf, size_t count)');
const writeFn = libc.func('long write(int fd, void *buf, size_t count)');
const eventfdFn = libc.func('int eventfd(uint initval, int flags)');
const mmapFn = libc.func(
  'void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)',
);
const munmapFn = libc.func('int munmap(void *addr, size_t length)');
const setsockoptFn = libc.func(
  'int setsockopt(int fd, int level, int name, void *value, uint32_t length)',
);
const getsockoptFn = libc.func(
  'int getsockopt(int fd, int level, int name, _Out_ void *value, _Inout_ uint32_t *length)',
);

/** A libc call's result: -1 becomes -errno, anything else is kept. */
export function sysResult(r: number | bigint): number {
  const n = Number(r);
  return n === -1 ? -koffi.errno() : n;
}

/** The address of a view's first byte (its own address, byteOffset included). */
export function addressOf(view: ArrayBufferView): number {
  return Number(koffi.address(view));
}

/** An ArrayBuffer over native memory, without copy (valid until that memory is unmapped). */
export function view(addr: bigint, length: number): ArrayBuffer {
  return koffi.view(addr, length);
}

export function closeFd(fd: number): number {
  return sysResult(closeFn(fd));
}

/** read(2) into `buf`; the byte count (0 at end), or -errno. */
export function read(fd: number, buf: Uint8Array): number {
  return sysResult(readFn(fd, buf, buf.byteLength));
}

/** write(2) of `buf`; the byte count, or -errno. */
export function write(fd: number, buf: Uint8Array): number {
  return sysResult(writeFn(fd, buf, buf.byteLength));
}

export const EFD_NONBLOCK = 0x800;
export const EFD_CLOEXEC = 0x80000;

/** A new eventfd (count 0); its fd, or -errno. */
export function eventfd(flags = EFD_NONBLOCK | EFD_CLOEXEC): number {
  return sysResult(eventfdFn(0, flags));
}

const eventfdScratch = new BigUint64Array(1);
/** Reads (clears) a non-blocking eventfd: the count, or -errno (-EAGAIN: not signalled). */
export function eventfdRead(fd: number): number {
  const r = sysResult(readFn(fd, eventfdScratch, 8));
  return r < 0 ? r : Number(eventfdScratch[0]);
}

const eventfdOne = new BigUint64Array([1n]);
/** Adds `value` (default 1) to an eventfd's count; 8, or -errno. */
export function eventfdSignal(fd: number, value = 1): number {
  const v = value === 1 ? eventfdOne : new BigUint64Array([BigInt(value)]);
  return sysResult(writeFn(fd, v, 8));
}

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_POPULATE = 0x8000;

/**
 * A shared read-write mapping of `length` bytes of `fd` at `offset` (`populate`: the pages
 * faulted in now, MAP_POPULATE); its address, or -errno.
 */
export function mmapShared(
  fd: number,
  length: number,
  offset: number | bigint,
  populate = false,
): bigint | number {
  const flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
  const p = mmapFn(null, length, PROT_READ | PROT_WRITE, flags, fd, offset) as
    | bigint
    | number
    | null;
  if (p === null || BigInt.asIntN(64, BigInt(p)) === -1n) return -koffi.errno();
  return BigInt(p);
}

export function munmap(addr: bigint, length: number): number {
  return sysResult(munmapFn(addr, length));
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_SNDBUFFORCE = 32;

/**
 * Sets a socket's send buffer to `bytes` as getsockopt reports it (the kernel doubles
 * what is asked, for its bookkeeping): with SO_SNDBUFFORCE where the process may
 * (CAP_NET_ADMIN), else SO_SNDBUF (which the kernel caps at net.core.wmem_max). The size
 * in effect, or -errno.
 */
export function setSendBufferSize(fd: number, bytes: number): number {
  const value = new Int32Array([Math.floor(bytes / 2)]);
  if (sysResult(setsockoptFn(fd, SOL_SOCKET, SO_SNDBUFFORCE, value, 4)) < 0) {
    const r = sysResult(setsockoptFn(fd, SOL_SOCKET, SO_SNDBUF, value, 4));
    if (r < 0) return r;
  }
  const length = new Uint32Array([4]);
  const r = sysResult(getsockoptFn(fd, SOL_SOCKET, SO_SNDBUF, value, length));
  return r < 0 ? r : (value[0] as number);
}

/** Calls `onReadable` on the event loop whenever `fd` is readable, until the handle is closed. */
export function pollReadable(fd: number, onReadable: () => void): node.PollHandle {
  return koffi.node.poll(fd, { readable: true }, onReadable);
}

export type PollHandle = node.PollHandle;

/** errno numbers (x86_64 Linux). */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  EPROTO: 71,
  ENOTSUP: 95,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  ENOTCONN: 107,
} as const;

const NAMES = new Map<number, string>();
for (const [name, n] of Object.entries(ERRNO)) if (!NAMES.has(n)) NAMES.set(n, name);

/** The name of an errno number ("EIO"), or "errno N" for one not listed. */
export function errnoName(n: number): string {
  return NAMES.get(n) ?? `errno ${n}`;
}
