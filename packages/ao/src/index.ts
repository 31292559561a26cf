// The public surface of @vmdisk/ao: what is not exported here is internal.
export { AoError } from './errors.ts';
