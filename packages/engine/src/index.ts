// The public surface of @vmdisk/engine: what is not exported here is internal.

export { pageAlignedBuffer } from './arena.ts';
export { openEngine, sharedEngine } from './engine.ts';
// The engine's contract: every type of engine-types.ts is public.
export type * from './engine-types.ts';
export { EngineError, ErrorCode, IoError } from './errors.ts';
export { dupFd, pread as readNow, setMallocMmapThreshold } from './native.ts';
export type { RadosOptions, RbdExtent } from './rbd.ts';
export { RadosCluster, RadosIoctx, RbdImage } from './rbd.ts';
export {
  IOV_MAX,
  pagesCached,
  recvNow,
  sendFileNow,
  sendNow,
  sendvNow,
  socketSender,
} from './socket-send.ts';
