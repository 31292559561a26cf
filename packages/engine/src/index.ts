// The public surface of @vmdisk/engine: what is not exported here is internal.
export { EngineError } from './errors.ts';
