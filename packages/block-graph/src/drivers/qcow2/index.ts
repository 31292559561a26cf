// The qcow2 driver's public surface, for the package's index.ts to re-export: the graph
// driver, image creation and checking, the image core (for tools and tests), errors.

export {
  Qcow2CorruptError,
  Qcow2Error,
  Qcow2ErrorCode,
  type Qcow2ErrorCodeValue,
  Qcow2UnsupportedError,
} from '../../errors.ts';
export { MAX_CHAIN_DEPTH, openQcow2Chain, type Qcow2Chain, type Qcow2FileOpener } from './chain.ts';
export { checkQcow2, type Qcow2CheckResult } from './check.ts';
export { createQcow2, type Qcow2CreateOptions, type Qcow2CreateProgress } from './create.ts';
export type { Qcow2Header } from './header.ts';
export {
  openQcow2,
  type Qcow2Extent,
  Qcow2Image,
  type Qcow2OpenOptions,
  type Qcow2ReadMapping,
  type Qcow2WriteMapping,
} from './image.ts';
export { qcow2Driver, qcow2FileOf } from './qcow2.ts';
export { RefcountOverflowError } from './refcount.ts';
export type { Qcow2BackingReader, Qcow2File } from './types.ts';
