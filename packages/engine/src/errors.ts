// The errors of @vmdisk/engine: every error carries a stable `code` (messages may change,
// codes never do). Other modules of this package throw only what is defined here.

export class EngineError extends Error {
  override name = 'EngineError';
  readonly code: string;

  constructor(code: `ERR_VMDISK_ENGINE_${string}`, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}
