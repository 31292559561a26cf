// The libc calls of the FUSE export, through koffi (no C addon, no libfuse): read and
// writev on the /dev/fuse fd (non-blocking, woken by a poll handle on the event loop),
// mount(2) and umount2(2).
import {
  addressOf,
  errnoName,
  libc,
  ERRNO as NATIVE_ERRNO,
  read,
  sysResult as ret,
} from '@vmdisk/native';

export { errnoName, read };

/** Errno numbers by name (x86_64 Linux), looked up by the names requests fail with. */
export const ERRNO: Readonly<Record<string, number>> = NATIVE_ERRNO;

const writevFn = libc.func('long writev(int fd, void *iov, int iovcnt)');
const mountFn = libc.func(
  'int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)',
);
const umount2Fn = libc.func('int umount2(const char *target, int flags)');

export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;

/** writev(2) of `bufs`; the byte count, or -errno. */
export function writev(fd: number, bufs: readonly Uint8Array[]): number {
  const iov = new BigUint64Array(bufs.length * 2);
  for (let i = 0; i < bufs.length; i++) {
    const b = bufs[i]!;
    iov[i * 2] = BigInt(addressOf(b));
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
