// @vmdisk/fuse: a FUSE export, qemu-storage-daemon's `--export type=fuse`.
export { FuseError } from './errors.ts';
export { type AllowOther, FuseExport, type FuseExportOptions } from './fuse-export.ts';
export type { FuseTarget } from './target.ts';
export { watchdogPid } from './watchdog.ts';
