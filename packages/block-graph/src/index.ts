// The public surface of @vmdisk/block-graph: what is not exported here is internal.
export { BlockError } from './errors.ts';
