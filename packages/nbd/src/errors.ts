// The errors of @vmdisk/nbd: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

export class NbdError extends Error {
  override name = 'NbdError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_NBD_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}
