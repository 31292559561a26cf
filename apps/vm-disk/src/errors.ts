// The errors of the vm-disk app: every error carries a stable `code` (messages may change,
// codes never do).

export type VmDiskErrorCode =
  | 'ERR_VMDISK_APP_BAD_OPTION'
  | 'ERR_VMDISK_APP_KEYVAL'
  | 'ERR_VMDISK_APP_QMP'
  /** `vm-disk create` refused what it was asked (e.g. an image its own backing file). */
  | 'ERR_VMDISK_APP_CREATE'
  /** An image subcommand used wrongly (unknown subcommand or option, missing file name). */
  | 'ERR_VMDISK_APP_USAGE'
  /** An image subcommand failed (convert, compare, check...): qemu-img's exit status 1. */
  | 'ERR_VMDISK_APP_IMAGE'
  /** A command talking to a running daemon (`vm-disk graph`) could not reach or use its monitor. */
  | 'ERR_VMDISK_APP_MONITOR'
  /** The metrics endpoint (--metrics) cannot listen on its address. */
  | 'ERR_VMDISK_APP_METRICS_LISTEN';

export class VmDiskError extends Error {
  override name = 'VmDiskError';
  readonly code: VmDiskErrorCode;
  constructor(code: VmDiskErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** A command-line option that cannot be used; `option` names it (e.g. `--blockdev`). */
export class BadOptionError extends VmDiskError {
  override name = 'BadOptionError';
  constructor(
    readonly option: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super('ERR_VMDISK_APP_BAD_OPTION', `${option}: ${message}`, options);
  }
}

/**
 * An image subcommand used wrongly, as qemu-img reports it: the message, then "Try
 * 'vm-disk --help' for more information", exit status 1.
 */
export class UsageError extends VmDiskError {
  override name = 'UsageError';
  constructor(message: string, options?: ErrorOptions) {
    super('ERR_VMDISK_APP_USAGE', message, options);
  }
}

/** An image subcommand that failed: its message as qemu-img's, exit status 1. */
export class ImageCommandError extends VmDiskError {
  override name = 'ImageCommandError';
  constructor(message: string, options?: ErrorOptions) {
    super('ERR_VMDISK_APP_IMAGE', message, options);
  }
}
