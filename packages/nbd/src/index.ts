// The public surface of @vmdisk/nbd: what is not exported here is internal.

// ---- The client ----
export type {
  BlockStatusResult,
  NbdBlockStatusOptions,
  NbdClientOptions,
  NbdClientTlsOptions,
  NbdConnectTarget,
  NbdExportListing,
  NbdExtent,
  NbdWriteOptions,
  NbdWriteZeroesOptions,
} from './client.ts';
export { NbdClient } from './client.ts';
export { nbdClientTarget } from './client-target.ts';
export {
  NbdCommandError,
  NbdConnectionError,
  NbdError,
  NbdOptionError,
  NbdSystemError,
} from './errors.ts';
export type {
  BitmapExtent,
  BlockSizeConstraints,
  BlockStatusOptions,
  ExportBitmap,
  ExportTarget,
  Extent,
  FileRange,
  SparsePiece,
  WriteFlags,
  WriteZeroesFlags,
} from './export-target.ts';
// ---- The server ----
export type {
  HandedOff,
  TransmissionOffer,
  TransmissionState,
} from './handoff.ts';
export type { FileSender } from './send-queue.ts';
export type {
  ConnectionEvent,
  ErrorEvent,
  ExportInfo,
  ExportOptions,
  ExportStats,
  ListenAddress,
  ListenOptions,
  NbdServerEvents,
  NbdServerOptions,
  ServerCounters,
} from './server.ts';
export { NbdServer } from './server.ts';
export type { NbdServerTlsOptions } from './server-tls.ts';
export { parsePskKeys } from './server-tls.ts';
export type { FileTargetOptions, TargetFile } from './targets/file-target.ts';
export { FileTarget } from './targets/file-target.ts';
export { MemoryTarget } from './targets/memory-target.ts';
export { listenUnixSocket } from './unix-socket.ts';
export type { NbdTransport, NbdUri, NbdUriTls } from './uri.ts';
export { NBD_DEFAULT_PORT, parseNbdUri } from './uri.ts';
