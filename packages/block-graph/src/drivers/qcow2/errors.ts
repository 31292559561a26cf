// The errors of the qcow2 driver. Each is a BlockError with a stable code
// `ERR_VMDISK_BLOCK_QCOW2_*` (messages may change, codes never do).

import { BlockError } from '../../errors.ts';

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
