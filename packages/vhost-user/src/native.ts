// libc entry points through koffi (no C addon): the unix socket the vhost-user messages
// and their file descriptors (SCM_RIGHTS) arrive on, which Node's net module cannot
// receive; and, from @vmdisk/native, mmap of the guest's memory and eventfds. Every
// wrapper returns -errno on failure.
import {
  closeFd,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  ERRNO,
  eventfd,
  eventfdRead,
  eventfdSignal,
  libc,
  mmapShared,
  munmap,
  addressOf as nativeAddressOf,
  pollReadable,
  read,
  sysResult as ret,
  view,
} from '@vmdisk/native';

export {
  closeFd,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  eventfdRead,
  eventfdSignal,
  mmapShared,
  munmap,
  pollReadable as pollHandle,
  read as readSome,
  view,
};

export const EAGAIN = ERRNO.EAGAIN;
export const EINTR = ERRNO.EINTR;

const socketFn = libc.func('int socket(int domain, int type, int protocol)');
const bindFn = libc.func('int bind(int fd, void *addr, uint32_t len)');
const listenFn = libc.func('int listen(int fd, int backlog)');
const accept4Fn = libc.func('int accept4(int fd, void *addr, void *len, int flags)');
const connectFn = libc.func('int connect(int fd, void *addr, uint32_t len)');
const recvmsgFn = libc.func('long recvmsg(int fd, void *msg, int flags)');
const sendmsgFn = libc.func('long sendmsg(int fd, void *msg, int flags)');
const recvFn = libc.func('long recv(int fd, void *buf, size_t len, int flags)');
const memfdCreateFn = libc.func('int memfd_create(const char *name, uint flags)');
const ftruncateFn = libc.func('int ftruncate(int fd, int64_t length)');

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0x800;
const SOCK_CLOEXEC = 0x80000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_NOSIGNAL = 0x4000;
const MSG_DONTWAIT = 0x40;
const MSG_CMSG_CLOEXEC = 0x40000000;

function addressOf(view: ArrayBufferView): bigint {
  return BigInt(nativeAddressOf(view));
}

/** struct sockaddr_un for `path` (at most 107 bytes); null when too long. */
function sockaddrUn(path: string): Uint8Array | null {
  const name = Buffer.from(path);
  if (name.length > 107) return null;
  const addr = new Uint8Array(110);
  addr[0] = AF_UNIX;
  addr.set(name, 2);
  return addr;
}

/** A listening non-blocking unix stream socket bound at `path`; fd or -errno. */
export function listenUnix(path: string, backlog = 1): number {
  const addr = sockaddrUn(path);
  if (!addr) return -36; // ENAMETOOLONG
  const fd = ret(socketFn(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (fd < 0) return fd;
  let r = ret(bindFn(fd, addr, 2 + Buffer.byteLength(path) + 1));
  if (r === 0) r = ret(listenFn(fd, backlog));
  if (r < 0) {
    closeFd(fd);
    return r;
  }
  return fd;
}

/** A blocking unix stream socket connected to `path` (the tests' client); fd or -errno. */
export function connectUnix(path: string): number {
  const addr = sockaddrUn(path);
  if (!addr) return -36;
  const fd = ret(socketFn(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd < 0) return fd;
  const r = ret(connectFn(fd, addr, 2 + Buffer.byteLength(path) + 1));
  if (r < 0) {
    closeFd(fd);
    return r;
  }
  return fd;
}

/** accept4 (non-blocking, close-on-exec); fd or -errno (-EAGAIN: none waiting). */
export function accept(fd: number): number {
  return ret(accept4Fn(fd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC));
}

// One msghdr, iovec and control buffer for all receives: the event loop is single
// threaded and each call is synchronous. Room for 32 fds (vhost-user sends at most 8).
const MAX_FDS = 32;
const msghdr = new Uint8Array(56);
const msgView = new DataView(msghdr.buffer);
const iovec = new Uint8Array(16);
const iovView = new DataView(iovec.buffer);
const control = new Uint8Array(16 + 4 * MAX_FDS);
const controlView = new DataView(control.buffer);

function setMsghdr(buf: Uint8Array, offset: number, length: number, controlLength: number): void {
  msghdr.fill(0);
  iovView.setBigUint64(0, addressOf(buf) + BigInt(offset), true);
  iovView.setBigUint64(8, BigInt(length), true);
  msgView.setBigUint64(16, addressOf(iovec), true);
  msgView.setBigUint64(24, 1n, true);
  if (controlLength > 0) {
    msgView.setBigUint64(32, addressOf(control), true);
    msgView.setBigUint64(40, BigInt(controlLength), true);
  }
}

/**
 * recvmsg into buf[offset, offset + length) without waiting: bytes read (0: the peer
 * closed) or -errno; the fds that came with them are appended to `fds` (close-on-exec).
 */
export function recvWithFds(
  fd: number,
  buf: Uint8Array,
  offset: number,
  length: number,
  fds: number[],
): number {
  setMsghdr(buf, offset, length, control.length);
  control.fill(0);
  const n = ret(recvmsgFn(fd, msghdr, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
  if (n < 0) return n;
  const controlLength = Number(msgView.getBigUint64(40, true));
  let at = 0;
  while (at + 16 <= controlLength) {
    const len = Number(controlView.getBigUint64(at, true));
    if (len < 16) break;
    const level = controlView.getInt32(at + 8, true);
    const type = controlView.getInt32(at + 12, true);
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = at + 16; p + 4 <= at + len; p += 4) fds.push(controlView.getInt32(p, true));
    }
    at += (len + 7) & ~7;
  }
  return n;
}

/** recv without waiting (no fds expected); bytes, 0 at end of stream, or -errno. */
export function recv(fd: number, buf: Uint8Array, offset: number, length: number): number {
  return ret(recvFn(fd, buf.subarray(offset, offset + length), length, MSG_DONTWAIT));
}

/** sendmsg of `data` with `fds` as SCM_RIGHTS (MSG_NOSIGNAL); bytes sent or -errno. */
export function sendWithFds(fd: number, data: Uint8Array, fds: readonly number[]): number {
  if (fds.length > MAX_FDS) return -22;
  setMsghdr(data, 0, data.length, fds.length > 0 ? 16 + 4 * fds.length : 0);
  if (fds.length > 0) {
    control.fill(0);
    controlView.setBigUint64(0, BigInt(16 + 4 * fds.length), true);
    controlView.setInt32(8, SOL_SOCKET, true);
    controlView.setInt32(12, SCM_RIGHTS, true);
    for (let i = 0; i < fds.length; i++) controlView.setInt32(16 + 4 * i, fds[i]!, true);
  }
  return ret(sendmsgFn(fd, msghdr, MSG_NOSIGNAL));
}

/** memfd_create + ftruncate (the tests' guest memory); fd or -errno. */
export function memfd(name: string, size: number): number {
  const fd = ret(memfdCreateFn(name, 1 /* MFD_CLOEXEC */));
  if (fd < 0) return fd;
  const r = ret(ftruncateFn(fd, size));
  if (r < 0) {
    closeFd(fd);
    return r;
  }
  return fd;
}

/** write() the whole of `data` to a blocking fd; bytes or -errno. */
export function writeAll(fd: number, data: Uint8Array): number {
  return sendWithFds(fd, data, []);
}

/** errno names and strerror texts (glibc's words, as QEMU prints them) of bind's failures. */
export const ERRNOS: Record<number, [name: string, text: string]> = {
  2: ['ENOENT', 'No such file or directory'],
  13: ['EACCES', 'Permission denied'],
  20: ['ENOTDIR', 'Not a directory'],
  30: ['EROFS', 'Read-only file system'],
  36: ['ENAMETOOLONG', 'File name too long'],
  98: ['EADDRINUSE', 'Address already in use'],
};
