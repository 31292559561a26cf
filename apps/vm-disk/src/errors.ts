// The errors of the vm-disk app: every error carries a stable `code` (messages may change,
// codes never do).

export type VmDiskErrorCode =
  | 'ERR_VMDISK_APP_BAD_OPTION'
  | 'ERR_VMDISK_APP_KEYVAL'
  | 'ERR_VMDISK_APP_QMP'
  /** `vm-disk create` refused what it was asked (e.g. an image its own backing file). */
  | 'ERR_VMDISK_APP_CREATE';

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
