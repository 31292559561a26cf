// The public surface of @vmdisk/block-graph: what is not exported here is internal.

export {
  type BackendOptions,
  type BackendWriteFlags,
  type BackendZeroFlags,
  BlockBackend,
  type Extent,
} from './backend.ts';
export { DEFAULT_MAX_BACKING_DEPTH } from './backing-chain.ts';
export type {
  BlockDriver,
  ChildSpec,
  DriverInstance,
  EngineLike,
  FilterInstance,
  FilterRequest,
  FormatInstance,
  Limits,
  MapIntent,
  Mapping,
  OpenContext,
  OptionSpec,
  ProtocolInstance,
  ProtocolStatus,
} from './driver.ts';
export { type BochsHeader, parseBochsHeader } from './drivers/bochs.ts';
export { lockForCreate } from './drivers/file-lock.ts';
export { builtinDrivers } from './drivers/index.ts';
export type { Qcow2CheckResult } from './drivers/qcow2/check.ts';
export { checkQcow2 } from './drivers/qcow2/check.ts';
export {
  checkQcow2CreateOptions,
  createQcow2,
  type Qcow2CreateOptions,
  type Qcow2CreateProgress,
} from './drivers/qcow2/create.ts';
export { parseHeader as parseQcow2Header, type Qcow2Header } from './drivers/qcow2/header.ts';
export { qcow2FileOf } from './drivers/qcow2/qcow2.ts';
export type { Qcow2File } from './drivers/qcow2/types.ts';
export { THROTTLE_LIMIT_KEYS, ThrottleGroup } from './drivers/throttle.ts';
export {
  BackingChainError,
  BlockError,
  BlockErrorCode,
  type BlockErrorCodeValue,
  BlockIoError,
  BlockOptionError,
  errnoName,
  errnoNumber,
  ImageLockError,
  Qcow2CorruptError,
  Qcow2Error,
  Qcow2ErrorCode,
  Qcow2UnsupportedError,
  toBlockError,
} from './errors.ts';
export {
  type AddOptions,
  BlockGraph,
  type BlockGraphOptions,
  isValidNodeName,
  type NodeInfo,
} from './graph.ts';
export { GraphLock } from './graph-lock.ts';
export { type BlockdevCreateOptions, blockdevCreate } from './jobs/create.ts';
export {
  BdrvChild,
  BlockNode,
  type ChildParent,
  checkRequest,
  type NodeSettings,
  type Status,
  type WriteFlags,
  type ZeroFlags,
} from './node.ts';
export {
  type BlockdevOptions,
  checkNoOtherKeys,
  checkOptions,
  keyBool,
  keyEnum,
  keyInt,
  keyList,
  keyObject,
  keyString,
  keyUint,
  type NodeSpec,
  type OptionSyntax,
  optionExpects,
  optionMissing,
  optionNotAccepted,
  optionTypeError,
  optionUnexpected,
} from './options.ts';
export {
  BLK_PERM_ALL,
  BLK_PERM_CONSISTENT_READ,
  BLK_PERM_RESIZE,
  BLK_PERM_WRITE,
  BLK_PERM_WRITE_UNCHANGED,
  type ChildRole,
  defaultChildPerms,
  type PermissionName,
  permBits,
  permNames,
} from './permissions.ts';
export { type RangeHold, RangeLock } from './range-lock.ts';
