// The errors of @vmdisk/block-graph: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.
//
// Every error also carries `errnoName`: the errno a protocol layer (an NBD export) answers
// with. Errors from the system (or injected by blkdebug) keep `errno`, `errnoName` and
// `syscall`.

import { constants } from 'node:os';

/** The stable codes of this package. */
export const BlockErrorCode = {
  /** An option of blockdev-add is unknown, missing, of the wrong type or out of range. */
  BAD_OPTION: 'ERR_VMDISK_BLOCK_BAD_OPTION',
  /** No driver of that name. */
  UNKNOWN_DRIVER: 'ERR_VMDISK_BLOCK_UNKNOWN_DRIVER',
  /** No node of that name. */
  NODE_NOT_FOUND: 'ERR_VMDISK_BLOCK_NODE_NOT_FOUND',
  /** A node of that name exists already. */
  DUPLICATE_NODE: 'ERR_VMDISK_BLOCK_DUPLICATE_NODE',
  /** A node is still used by parents or backends (or is not owned by the graph's user). */
  NODE_IN_USE: 'ERR_VMDISK_BLOCK_NODE_IN_USE',
  /** Permissions taken by one parent are not shared by another (or the node is read-only). */
  PERMISSION_CONFLICT: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT',
  /** A write-like request on a node or backend that may not write. */
  READ_ONLY: 'ERR_VMDISK_BLOCK_READ_ONLY',
  /** A request outside the node (negative, past the end, not a safe integer). */
  OUT_OF_BOUNDS: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
  /** An I/O error with an errno (from the system or injected). */
  IO: 'ERR_VMDISK_BLOCK_IO',
  /** An operation the node cannot do (e.g. fast zeroing). */
  NOT_SUPPORTED: 'ERR_VMDISK_BLOCK_NOT_SUPPORTED',
  /** An image whose header or metadata is invalid. */
  CORRUPT_IMAGE: 'ERR_VMDISK_BLOCK_CORRUPT_IMAGE',
  /** A graph change that would make a cycle or is otherwise not possible. */
  BAD_GRAPH_CHANGE: 'ERR_VMDISK_BLOCK_BAD_GRAPH_CHANGE',
  /** No object (e.g. throttle-group) of that id. */
  OBJECT_NOT_FOUND: 'ERR_VMDISK_BLOCK_OBJECT_NOT_FOUND',
  /** An object of that id exists already. */
  DUPLICATE_OBJECT: 'ERR_VMDISK_BLOCK_DUPLICATE_OBJECT',
  /** An object is still used by nodes. */
  OBJECT_IN_USE: 'ERR_VMDISK_BLOCK_OBJECT_IN_USE',
  /** The backend or graph is closed. */
  CLOSED: 'ERR_VMDISK_BLOCK_CLOSED',
  /**
   * Another process's image lock refuses a permission (QEMU's "Failed to get "write"
   * lock"): an ImageLockError, whose `hint` asks whether another process uses the image.
   */
  IMAGE_LOCKED: 'ERR_VMDISK_BLOCK_IMAGE_LOCKED',
  /** A backing chain comes back to a file already in it (BackingChainError). */
  BACKING_LOOP: 'ERR_VMDISK_BLOCK_BACKING_LOOP',
  /** A backing chain deeper than the graph allows (BackingChainError). */
  BACKING_CHAIN_TOO_DEEP: 'ERR_VMDISK_BLOCK_BACKING_CHAIN_TOO_DEEP',
  /** A node is used by a block job (QEMU's op blockers: "Node 'x' is busy: ..."). */
  NODE_BUSY: 'ERR_VMDISK_BLOCK_NODE_BUSY',
  /** A block job's arguments are refused (QEMU's wording); nothing was started. */
  BAD_JOB: 'ERR_VMDISK_BLOCK_BAD_JOB',
  /** No dirty bitmap of that name on the node. */
  BITMAP_NOT_FOUND: 'ERR_VMDISK_BLOCK_BITMAP_NOT_FOUND',
  /** A dirty bitmap of that name exists already on the node. */
  DUPLICATE_BITMAP: 'ERR_VMDISK_BLOCK_DUPLICATE_BITMAP',
  /**
   * A dirty bitmap may not be used or changed: busy (a job or export uses it), read-only
   * (loaded from a read-only image) or inconsistent (found in use in the image).
   */
  BITMAP_IN_USE: 'ERR_VMDISK_BLOCK_BITMAP_IN_USE',
  /** A dirty bitmap cannot be made persistent on the node (QEMU's reasons). */
  BITMAP_NOT_STORABLE: 'ERR_VMDISK_BLOCK_BITMAP_NOT_STORABLE',
} as const;

export type BlockErrorCodeValue = (typeof BlockErrorCode)[keyof typeof BlockErrorCode];

export class BlockError extends Error {
  override name = 'BlockError';
  readonly code: string;
  /** The errno name a protocol answers with ('EINVAL', 'EPERM', 'EIO', ...). */
  errnoName: string;

  constructor(
    code: `ERR_VMDISK_BLOCK_${string}`,
    message: string,
    options?: ErrorOptions & { errnoName?: string },
  ) {
    super(message, options);
    this.code = code;
    this.errnoName = options?.errnoName ?? defaultErrno(code);
  }
}

function defaultErrno(code: string): string {
  switch (code) {
    case BlockErrorCode.READ_ONLY:
    case BlockErrorCode.PERMISSION_CONFLICT:
      return 'EPERM';
    case BlockErrorCode.NOT_SUPPORTED:
      return 'ENOTSUP';
    case BlockErrorCode.NODE_IN_USE:
    case BlockErrorCode.OBJECT_IN_USE:
      return 'EBUSY';
    case BlockErrorCode.NODE_NOT_FOUND:
    case BlockErrorCode.OBJECT_NOT_FOUND:
      return 'ENOENT';
    case BlockErrorCode.DUPLICATE_NODE:
    case BlockErrorCode.DUPLICATE_OBJECT:
      return 'EEXIST';
    case BlockErrorCode.CLOSED:
      return 'ESHUTDOWN';
    case BlockErrorCode.IO:
    case BlockErrorCode.CORRUPT_IMAGE:
      return 'EIO';
    default:
      return 'EINVAL';
  }
}

/**
 * An option of blockdev-add that is wrong; `key` is its dotted path ('file.filename').
 * The message is `Invalid option 'KEY': WHY`, or `message` when given (QEMU's own words
 * for wrong types and missing or unexpected members, see options.ts).
 */
export class BlockOptionError extends BlockError {
  override name = 'BlockOptionError';
  readonly key: string;
  constructor(key: string, why: string, message?: string) {
    super(BlockErrorCode.BAD_OPTION, message ?? `Invalid option '${key}': ${why}`);
    this.key = key;
  }
}

/** The error of a permission that another process's lock refuses. */
export class ImageLockError extends BlockError {
  override name = 'ImageLockError';
  /** What QEMU prints after the message on its command line (not in QMP replies). */
  readonly hint: string;
  constructor(message: string, path: string, options?: ErrorOptions) {
    super(BlockErrorCode.IMAGE_LOCKED, message, { ...options, errnoName: 'EAGAIN' });
    this.hint = `Is another process using the image [${path}]?`;
  }
}

/** An I/O error with an errno: from the system (through the engine) or injected by blkdebug. */
export class BlockIoError extends BlockError {
  override name = 'BlockIoError';
  readonly errno: number;
  readonly syscall: string;
  readonly offset?: number;
  readonly length?: number;
  /** The node the error happened on. */
  readonly node?: string;

  constructor(
    message: string,
    init: {
      errnoName: string;
      errno?: number;
      syscall: string;
      offset?: number;
      length?: number;
      node?: string;
      cause?: unknown;
    },
  ) {
    super(BlockErrorCode.IO, message, { cause: init.cause, errnoName: init.errnoName });
    this.errno = init.errno ?? errnoNumber(init.errnoName);
    this.syscall = init.syscall;
    if (init.offset !== undefined) this.offset = init.offset;
    if (init.length !== undefined) this.length = init.length;
    if (init.node !== undefined) this.node = init.node;
  }
}

/** A backing chain that loops or is too deep; `filename` names the file where it stopped. */
export class BackingChainError extends BlockError {
  override name = 'BackingChainError';
  readonly filename: string;
  constructor(
    code: typeof BlockErrorCode.BACKING_LOOP | typeof BlockErrorCode.BACKING_CHAIN_TOO_DEEP,
    filename: string,
    message: string,
  ) {
    super(code, message, { errnoName: code === BlockErrorCode.BACKING_LOOP ? 'ELOOP' : 'EINVAL' });
    this.filename = filename;
  }
}

const errnoTable = constants.errno as Record<string, number>;

/** The number of an errno name on this system ('EIO' -> 5); 0 when unknown. */
export function errnoNumber(name: string): number {
  return errnoTable[name] ?? 0;
}

/** The name of an errno number on this system (5 -> 'EIO'); undefined when unknown. */
export function errnoName(errno: number): string | undefined {
  for (const [name, value] of Object.entries(errnoTable)) if (value === errno) return name;
  return undefined;
}

/**
 * Turns an error from below (the engine, a driver) into one of ours, keeping errno, errno
 * name and syscall; errors that are already ours pass unchanged.
 */
export function toBlockError(err: unknown, node?: string): BlockError {
  if (err instanceof BlockError) return err;
  const e = err as {
    message?: string;
    errno?: number;
    errnoName?: string;
    code?: string;
    syscall?: string;
    offset?: number;
    length?: number;
  };
  let name = typeof e?.errnoName === 'string' ? e.errnoName : undefined;
  if (!name && typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code)) name = e.code;
  let num = typeof e?.errno === 'number' ? Math.abs(e.errno) : undefined;
  if (!name && num !== undefined) name = errnoName(num);
  if (name && num === undefined) num = errnoNumber(name);
  const init: ConstructorParameters<typeof BlockIoError>[1] = {
    errnoName: name ?? 'EIO',
    syscall: typeof e?.syscall === 'string' ? e.syscall : 'unknown',
    cause: err,
  };
  if (num !== undefined) init.errno = num;
  if (typeof e?.offset === 'number') init.offset = e.offset;
  if (typeof e?.length === 'number') init.length = e.length;
  if (node !== undefined) init.node = node;
  return new BlockIoError(`${e?.message ?? String(err)}`, init);
}

// ---------------------------------------------------------------- the qcow2 driver
// Each is a BlockError with a stable code `ERR_VMDISK_BLOCK_QCOW2_*`.

/** The stable codes of the qcow2 driver. */
export const Qcow2ErrorCode = {
  /** The file is not a qcow2 image (bad magic) or its header is malformed. */
  BAD_HEADER: 'ERR_VMDISK_BLOCK_QCOW2_BAD_HEADER',
  /** The image uses a feature this driver does not implement; `feature` names it. */
  UNSUPPORTED_FEATURE: 'ERR_VMDISK_BLOCK_QCOW2_UNSUPPORTED_FEATURE',
  /** Metadata is inconsistent: a table is truncated, misaligned, overlaps other metadata. */
  CORRUPT: 'ERR_VMDISK_BLOCK_QCOW2_CORRUPT',
  /** A refcount would exceed the largest value refcount_bits can hold. */
  REFCOUNT_OVERFLOW: 'ERR_VMDISK_BLOCK_QCOW2_REFCOUNT_OVERFLOW',
  /** A compressed cluster could not be decompressed (or the compression type is unknown). */
  COMPRESSION: 'ERR_VMDISK_BLOCK_QCOW2_COMPRESSION',
  /** A write-like request on an image opened read-only (or marked corrupt). */
  READ_ONLY: 'ERR_VMDISK_BLOCK_QCOW2_READ_ONLY',
  /** An option of open or create is out of range or inconsistent. */
  BAD_OPTION: 'ERR_VMDISK_BLOCK_QCOW2_BAD_OPTION',
  /** The backing chain loops back to an image already in it, or is too deep. */
  BACKING_CYCLE: 'ERR_VMDISK_BLOCK_QCOW2_BACKING_CYCLE',
  /** The image is closed. */
  CLOSED: 'ERR_VMDISK_BLOCK_QCOW2_CLOSED',
  /** No internal snapshot has the id or name asked for. */
  SNAPSHOT_NOT_FOUND: 'ERR_VMDISK_BLOCK_QCOW2_SNAPSHOT_NOT_FOUND',
} as const;

export type Qcow2ErrorCodeValue = (typeof Qcow2ErrorCode)[keyof typeof Qcow2ErrorCode];

/** Base class of the qcow2 driver's errors. */
export class Qcow2Error extends BlockError {
  override name = 'Qcow2Error';
  constructor(code: Qcow2ErrorCodeValue, message: string, options?: ErrorOptions) {
    super(code, message, options);
  }
}

/** Metadata that cannot be right; the image should be checked (`qemu-img check`). */
export class Qcow2CorruptError extends Qcow2Error {
  override name = 'Qcow2CorruptError';
  constructor(message: string, options?: ErrorOptions) {
    super(Qcow2ErrorCode.CORRUPT, `qcow2 image is corrupt: ${message}`, options);
  }
}

/** A feature of the image that this driver refuses; `feature` is its qcow2.txt name. */
export class Qcow2UnsupportedError extends Qcow2Error {
  override name = 'Qcow2UnsupportedError';
  readonly feature: string;
  constructor(feature: string, message: string) {
    super(Qcow2ErrorCode.UNSUPPORTED_FEATURE, message);
    this.feature = feature;
  }
}

export function badHeader(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, `Invalid qcow2 header: ${message}`);
}

export function badOption(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, message);
}

// ---------------------------------------------------------------- the rbd driver
// Each is a BlockError with a stable code `ERR_VMDISK_BLOCK_RBD_*` and the errno librados or
// librbd answered; the message is QEMU 7.2's (block/rbd.c).

export const RbdErrorCode = {
  /** The ceph.conf named by `conf` could not be read. */
  CONF: 'ERR_VMDISK_BLOCK_RBD_CONF',
  /** A setting (key, mon_host, auth_client_required, a key=value pair) was refused. */
  SETTING: 'ERR_VMDISK_BLOCK_RBD_SETTING',
  /** No connection to the cluster: no monitor answered in time, or authentication failed. */
  CONNECT: 'ERR_VMDISK_BLOCK_RBD_CONNECT',
  /** The pool (or namespace) could not be opened: missing, or not permitted. */
  POOL: 'ERR_VMDISK_BLOCK_RBD_POOL',
  /** The image (or snapshot) could not be opened: missing, or not permitted. */
  IMAGE: 'ERR_VMDISK_BLOCK_RBD_IMAGE',
  /** The image could not be created (exists already, bad object size). */
  CREATE: 'ERR_VMDISK_BLOCK_RBD_CREATE',
} as const;

export type RbdErrorCodeValue = (typeof RbdErrorCode)[keyof typeof RbdErrorCode];

export class RbdError extends BlockError {
  override name = 'RbdError';
  constructor(
    code: RbdErrorCodeValue,
    message: string,
    options?: ErrorOptions & { errnoName?: string },
  ) {
    super(code, message, options);
  }
}
