// The errors of @vmdisk/block-graph: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

export class BlockError extends Error {
  override name = 'BlockError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_BLOCK_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}
