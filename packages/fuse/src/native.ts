// The libc calls of the FUSE export, through koffi (no C addon, no libfuse): read and
// writev on the /dev/fuse fd (non-blocking, woken by a poll handle on the event loop),
// mount(2) and umount2(2).
import koffi from 'koffi';

const libc = koffi.load('libc.so.6');

const readFn = libc.func('long read(int fd, void *buf, size_t count)');
const writevFn = libc.func('long writev(int fd, void *iov, int iovcnt)');
const mountFn = libc.func(
  'int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)',
);
const umount2Fn = libc.func('int umount2(const char *target, int flags)');

export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;

/** Errno numbers the export answers with (x86_64 Linux). */
export const ERRNO: Record<string, number> = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  EPROTO: 71,
  ENOTSUP: 95,
  EOPNOTSUPP: 95,
  ENOTCONN: 107,
};

const NAMES = new Map<number, string>();
for (const [name, n] of Object.entries(ERRNO)) if (!NAMES.has(n)) NAMES.set(n, name);

export function errnoName(n: number): string {
  return NAMES.get(n) ?? `errno ${n}`;
}

function ret(r: number | bigint): number {
  const n = Number(r);
  return n === -1 ? -koffi.errno() : n;
}

/** read(2); the byte count, or -errno. */
export function read(fd: number, buf: Uint8Array): number {
  return ret(readFn(fd, buf, buf.byteLength));
}

/** writev(2) of `bufs`; the byte count, or -errno. */
export function writev(fd: number, bufs: readonly Uint8Array[]): number {
  const iov = new BigUint64Array(bufs.length * 2);
  for (let i = 0; i < bufs.length; i++) {
    const b = bufs[i]!;
    iov[i * 2] = BigInt(koffi.address(b));
    iov[i * 2 + 1] = BigInt(b.byteLength);
  }
  return ret(writevFn(fd, iov, bufs.length));
}

/** mount(2); 0 or -errno. */
export function mount(
  source: string,
  target: string,
  fstype: string,
  flags: number,
  data: string,
): number {
  return ret(mountFn(source, target, fstype, flags, data));
}

/** umount2(2); 0 or -errno. */
export function umount2(target: string, flags: number): number {
  return ret(umount2Fn(target, flags));
}
