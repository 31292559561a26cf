// The public surface of @vmdisk/nbd: what is not exported here is internal.
export { NbdError } from './errors.ts';
export type {
  BlockSizeConstraints,
  ExportTarget,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from './export-target.ts';
