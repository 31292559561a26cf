// Sending a file's bytes to a socket from the page cache (sendfile(2)), for a server that
// answers a read with them: the kernel hands the cached pages to the socket instead of
// copying them into a buffer of ours and out again (on a unix socket, Linux 6.5 and later
// splice the pages into the socket: no copy at all on our side). Everything here runs on
// the calling thread, never waits, and returns -errno rather than throwing: the caller
// falls back to reading and writing the bytes itself.
import koffi from 'koffi';
import { ret } from './native.ts';

const libc = koffi.load('libc.so.6');
const sendFn = libc.func('long send(int fd, void *buf, size_t len, int flags)');
const sendfileFn = libc.func('long sendfile(int out_fd, int in_fd, void *offset, size_t count)');
const cachestatFn = libc.func('syscall', 'long', ['long', 'int', 'void *', 'void *', 'uint']);

const SYS_CACHESTAT = 451;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const ENOSYS = 38;
const PAGE = 4096;

/** send(2) without waiting: the bytes the socket took, or -errno (-EAGAIN: none now). */
export function sendNow(sockFd: number, buf: Uint8Array): number {
  return ret(sendFn(sockFd, buf, buf.byteLength, MSG_DONTWAIT | MSG_NOSIGNAL));
}

const fileOffset = new BigInt64Array(1);

/**
 * sendfile(2) of `length` bytes of `fileFd` at `offset` to a non-blocking socket: the
 * bytes the socket took (fewer when its buffer filled), or -errno.
 */
export function sendFileNow(
  sockFd: number,
  fileFd: number,
  offset: number,
  length: number,
): number {
  fileOffset[0] = BigInt(offset);
  return ret(sendfileFn(sockFd, fileFd, fileOffset, length));
}

const range = new BigUint64Array(2);
const stat = new BigUint64Array(5);
let cachestatMissing = false;

/**
 * Whether every page of [offset, offset + length) of the file is in the page cache now
 * (cachestat(2), Linux 6.5): a buffered read or a sendfile of it does not wait for a
 * disk. False where the kernel cannot say, and for holes (not cached, though they read
 * as zeros).
 */
export function pagesCached(fd: number, offset: number, length: number): boolean {
  if (cachestatMissing || length <= 0) return false;
  const first = Math.floor(offset / PAGE);
  const end = Math.ceil((offset + length) / PAGE);
  range[0] = BigInt(first * PAGE);
  range[1] = BigInt((end - first) * PAGE);
  const r = ret(cachestatFn(SYS_CACHESTAT, fd, range, stat, 0));
  if (r < 0) {
    if (r === -ENOSYS) cachestatMissing = true;
    return false;
  }
  return Number(stat[0]) >= end - first;
}
