// The public surface of @vmdisk/nbd: what is not exported here is internal.
export { NbdError } from './errors.ts';
export type {
  BlockSizeConstraints,
  ExportTarget,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from './export-target.ts';

// ---- The client ----
export type {
  BlockStatusResult,
  NbdBlockStatusOptions,
  NbdClientOptions,
  NbdClientTlsOptions,
  NbdConnectTarget,
  NbdExtent,
  NbdWriteOptions,
  NbdWriteZeroesOptions,
} from './client.ts';
export { NbdClient } from './client.ts';
export { NbdCommandError, NbdConnectionError, NbdOptionError } from './errors.ts';
export type { NbdTransport, NbdUri, NbdUriTls } from './uri.ts';
export { NBD_DEFAULT_PORT, parseNbdUri } from './uri.ts';
