// The errors of @vmdisk/engine: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.
import { getSystemErrorName } from 'node:util';

export class EngineError extends Error {
  override name = 'EngineError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_ENGINE_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** The stable codes of this package. */
export const ErrorCode = {
  /** A system call failed: an `IoError` carrying errno, errnoName and syscall. */
  IO: 'ERR_VMDISK_ENGINE_IO',
  /** An O_DIRECT request whose offset, length or buffer address is not aligned. */
  MISALIGNED: 'ERR_VMDISK_ENGINE_MISALIGNED',
  /** Work given to an engine that is closed or closing. */
  CLOSED: 'ERR_VMDISK_ENGINE_CLOSED',
  /** Work given to a file that is closed or closing. */
  FILE_CLOSED: 'ERR_VMDISK_ENGINE_FILE_CLOSED',
  /** A backend was asked for (option or VMDISK_ENGINE) that cannot work on this system. */
  BACKEND_UNAVAILABLE: 'ERR_VMDISK_ENGINE_BACKEND_UNAVAILABLE',
  /** A bad argument: unknown backend name, negative offset, not a Uint8Array, ... */
  INVALID_ARGUMENT: 'ERR_VMDISK_ENGINE_INVALID_ARGUMENT',
  /** An operation these files cannot do (copyTo with an O_DIRECT file). */
  NOT_SUPPORTED: 'ERR_VMDISK_ENGINE_NOT_SUPPORTED',
} as const;

export interface IoErrorDetails {
  path?: string;
  offset?: number;
  length?: number;
}

/** Errno (positive) to its name, e.g. 5 -> 'EIO'. */
export function errnoName(errno: number): string {
  try {
    return getSystemErrorName(-errno);
  } catch {
    return `E${errno}`;
  }
}

/** A failed system call: errno (positive number), its name, the syscall, and where. */
export class IoError extends EngineError {
  override name = 'IoError';
  readonly errno: number;
  readonly errnoName: string;
  readonly syscall: string;
  readonly path?: string;
  readonly offset?: number;
  readonly length?: number;

  constructor(
    errno: number,
    syscall: string,
    details: IoErrorDetails = {},
    options?: ErrorOptions,
  ) {
    const name = errnoName(errno);
    const where: string[] = [];
    if (details.path !== undefined) where.push(`'${details.path}'`);
    if (details.offset !== undefined) where.push(`offset ${details.offset}`);
    if (details.length !== undefined) where.push(`length ${details.length}`);
    super(
      ErrorCode.IO,
      `${name}: ${syscall} failed${where.length > 0 ? ` (${where.join(', ')})` : ''}`,
      options,
    );
    this.errno = errno;
    this.errnoName = name;
    this.syscall = syscall;
    if (details.path !== undefined) this.path = details.path;
    if (details.offset !== undefined) this.offset = details.offset;
    if (details.length !== undefined) this.length = details.length;
  }
}

/** An IoError from an error Node's fs gave (err.errno is negative there). */
export function fromNodeError(
  err: NodeJS.ErrnoException,
  syscall: string,
  details: IoErrorDetails = {},
): IoError {
  const errno = typeof err.errno === 'number' ? Math.abs(err.errno) : 5;
  return new IoError(errno, syscall, details, { cause: err });
}
