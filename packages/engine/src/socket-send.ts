// Writing to a socket's descriptor directly (and reading it: recvNow), for a server whose
// replies would otherwise go through Node's stream machinery: a turn's replies in one
// sendmsg(2), and a file's bytes from the page cache (sendfile(2)): the kernel hands the
// cached pages to the socket instead of copying them into a buffer of ours and out again
// (on a unix socket, Linux 6.5 and later splice the pages into the socket: no copy at all
// on our side).
// Everything here runs on the calling thread, never waits, and returns -errno rather
// than throwing: the caller falls back to the socket's own write.
import koffi from 'koffi';
import { addressOf, pread, ret } from './native.ts';

const libc = koffi.load('libc.so.6');
const sendFn = libc.func('long send(int fd, void *buf, size_t len, int flags)');
const sendmsgFn = libc.func('long sendmsg(int fd, void *msg, int flags)');
const recvFn = libc.func('long recv(int fd, void *buf, size_t len, int flags)');
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

/**
 * recv(2) without waiting: the bytes read into `buf`, 0 at the end of the stream, or
 * -errno (-EAGAIN: nothing there now).
 */
export function recvNow(sockFd: number, buf: Uint8Array): number {
  return ret(recvFn(sockFd, buf, buf.byteLength, MSG_DONTWAIT));
}

/** Linux's UIO_MAXIOV: the most buffers one sendmsg takes. */
export const IOV_MAX = 1024;
/** struct iovec[IOV_MAX]: base and length, each a 64-bit word as two 32-bit halves. */
const iov = new Uint32Array(IOV_MAX * 4);
/** struct msghdr (56 bytes on 64-bit Linux): msg_iov at byte 16, msg_iovlen at 24. */
const msghdr = new Uint32Array(14);
const iovAddress = addressOf(iov);
msghdr[4] = iovAddress >>> 0;
msghdr[5] = (iovAddress / 2 ** 32) >>> 0;

/**
 * sendmsg(2) of `bufs` in order without waiting: the bytes the socket took (it may take
 * part of a buffer), or -errno (-EAGAIN: none now). At most IOV_MAX buffers go.
 */
export function sendvNow(sockFd: number, bufs: readonly Uint8Array[]): number {
  const n = Math.min(bufs.length, IOV_MAX);
  for (let i = 0; i < n; i++) {
    const b = bufs[i]!;
    const a = addressOf(b);
    iov[4 * i] = a >>> 0;
    iov[4 * i + 1] = (a / 2 ** 32) >>> 0;
    iov[4 * i + 2] = b.byteLength;
    iov[4 * i + 3] = 0;
  }
  msghdr[6] = n;
  return ret(sendmsgFn(sockFd, msghdr, MSG_DONTWAIT | MSG_NOSIGNAL));
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

/**
 * Everything above in one object, the shape @vmdisk/nbd's server takes as its
 * `fileSender`: replies sent by sendmsg, READs of cached pages by sendfile.
 */
export const socketSender = {
  send: sendNow,
  sendv: sendvNow,
  sendFile: sendFileNow,
  read: pread,
} as const;
