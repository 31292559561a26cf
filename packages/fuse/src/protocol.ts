// The FUSE kernel protocol (linux/fuse_kernel.h) as far as one regular file needs it: the
// opcodes, the request header and the few structures read or written, little-endian.
// Every request read from /dev/fuse is one fuse_in_header and its body; every reply is a
// fuse_out_header (error = -errno, or 0 and a body). FORGET and BATCH_FORGET get no reply.

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we speak: fuse_init_out as of 7.23+, with max_pages (7.28). */
export const FUSE_KERNEL_MINOR_VERSION = 31;
export const FUSE_ROOT_ID = 1;

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  LSEEK: 46,
} as const;

/** fuse_init_in/out flags. */
export const Init = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  AUTO_INVAL_DATA: 1 << 12,
  /** Asynchronous direct I/O: without it the kernel waits for each O_DIRECT request. */
  ASYNC_DIO: 1 << 15,
  MAX_PAGES: 1 << 22,
} as const;

/** fuse_setattr_in.valid. */
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_FH = 1 << 6;
export const FATTR_LOCKOWNER = 1 << 9;
/** Bits the kernel sets along with others that say nothing to be changed. */
export const FATTR_IGNORED = FATTR_FH | FATTR_LOCKOWNER;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const S_IFREG = 0o100000;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const WRITE_IN_SIZE = 40;
const ATTR_SIZE = 88;

export interface InHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: bigint;
  uid: number;
  gid: number;
  pid: number;
}

export function parseInHeader(v: DataView): InHeader {
  return {
    len: v.getUint32(0, true),
    opcode: v.getUint32(4, true),
    unique: v.getBigUint64(8, true),
    nodeid: v.getBigUint64(16, true),
    uid: v.getUint32(24, true),
    gid: v.getUint32(28, true),
    pid: v.getUint32(32, true),
  };
}

/** A reply header: `len` bytes in all (header included), error as -errno or 0. */
export function outHeader(unique: bigint, error: number, len: number): Uint8Array {
  const b = new Uint8Array(OUT_HEADER_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, len, true);
  v.setInt32(4, error, true);
  v.setBigUint64(8, unique, true);
  return b;
}

export interface Attr {
  ino: number;
  size: number;
  blocks: number;
  /** Seconds since the epoch (atime, mtime and ctime alike, as QEMU reports them). */
  time: number;
  mode: number;
  uid: number;
  gid: number;
  blksize: number;
}

function putAttr(v: DataView, at: number, a: Attr): void {
  v.setBigUint64(at, BigInt(a.ino), true);
  v.setBigUint64(at + 8, BigInt(a.size), true);
  v.setBigUint64(at + 16, BigInt(a.blocks), true);
  for (const off of [24, 32, 40]) v.setBigUint64(at + off, BigInt(a.time), true);
  v.setUint32(at + 60, a.mode, true);
  v.setUint32(at + 64, 1, true); // nlink
  v.setUint32(at + 68, a.uid, true);
  v.setUint32(at + 72, a.gid, true);
  v.setUint32(at + 80, a.blksize, true);
}

/** fuse_attr_out: the attributes, valid for `validSeconds`. */
export function attrOut(a: Attr, validSeconds: number): Uint8Array {
  const b = new Uint8Array(16 + ATTR_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(validSeconds), true);
  putAttr(v, 16, a);
  return b;
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
}

export function parseInitIn(v: DataView, at: number): InitIn {
  return {
    major: v.getUint32(at, true),
    minor: v.getUint32(at + 4, true),
    maxReadahead: v.getUint32(at + 8, true),
    flags: v.getUint32(at + 12, true),
  };
}

/** fuse_init_out (64 bytes). */
export function initOut(o: {
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  maxPages: number;
}): Uint8Array {
  const b = new Uint8Array(64);
  const v = new DataView(b.buffer);
  v.setUint32(0, FUSE_KERNEL_VERSION, true);
  v.setUint32(4, FUSE_KERNEL_MINOR_VERSION, true);
  v.setUint32(8, o.maxReadahead, true);
  v.setUint32(12, o.flags, true);
  v.setUint16(16, o.maxBackground, true);
  v.setUint16(18, o.congestionThreshold, true);
  v.setUint32(20, o.maxWrite, true);
  v.setUint32(24, 1, true); // time_gran: nanoseconds
  v.setUint16(28, o.maxPages, true);
  return b;
}

export interface SetattrIn {
  valid: number;
  size: number;
  mode: number;
  uid: number;
  gid: number;
}

export function parseSetattrIn(v: DataView, at: number): SetattrIn {
  return {
    valid: v.getUint32(at, true),
    size: Number(v.getBigUint64(at + 16, true)),
    mode: v.getUint32(at + 68, true),
    uid: v.getUint32(at + 76, true),
    gid: v.getUint32(at + 80, true),
  };
}

/** fuse_read_in and fuse_write_in share offset (at 8) and size (at 16). */
export function parseIo(v: DataView, at: number): { offset: number; size: number } {
  return { offset: Number(v.getBigUint64(at + 8, true)), size: v.getUint32(at + 16, true) };
}

export function parseFallocateIn(
  v: DataView,
  at: number,
): { offset: number; length: number; mode: number } {
  return {
    offset: Number(v.getBigUint64(at + 8, true)),
    length: Number(v.getBigUint64(at + 16, true)),
    mode: v.getUint32(at + 24, true),
  };
}

export function parseLseekIn(v: DataView, at: number): { offset: number; whence: number } {
  return { offset: Number(v.getBigUint64(at + 8, true)), whence: v.getUint32(at + 16, true) };
}

/** fuse_open_out: fh 0, no FOPEN_* flags (the page cache is used, dropped at each open). */
export function openOut(): Uint8Array {
  return new Uint8Array(16);
}

export function writeOut(size: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setUint32(0, size, true);
  return b;
}

export function lseekOut(offset: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(offset), true);
  return b;
}

/** fuse_statfs_out as libfuse answers without a statfs handler: bsize 512, namelen 255. */
export function statfsOut(): Uint8Array {
  const b = new Uint8Array(80);
  const v = new DataView(b.buffer);
  v.setUint32(40, 512, true); // bsize
  v.setUint32(44, 255, true); // namelen
  return b;
}
