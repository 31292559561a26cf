// The errors of @vmdisk/ao: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

export class AoError extends Error {
  override name = 'AoError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_AO_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}
