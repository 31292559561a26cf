// The public surface of @vmdisk/block-graph: what is not exported here is internal.

export {
  type BackendOptions,
  type BackendWriteFlags,
  type BackendZeroFlags,
  BlockBackend,
  type Extent,
} from './backend.ts';
export { DEFAULT_MAX_BACKING_DEPTH } from './backing-chain.ts';
export {
  BdrvDirtyBitmap,
  type BlockDirtyInfo,
  checkGranularity,
  defaultGranularity,
} from './dirty-bitmap.ts';
export {
  BITMAP_ALLOW_RO,
  BITMAP_BUSY,
  BITMAP_DEFAULT,
  BITMAP_INCONSISTENT,
  BITMAP_RO,
  checkDirtyBitmap,
  mergeDirtyBitmap,
} from './dirty-bitmap-check.ts';
export {
  type BlockDirtyBitmapOrStr,
  blockDirtyBitmapAdd,
  blockDirtyBitmapClear,
  blockDirtyBitmapEnable,
  blockDirtyBitmapMerge,
  blockDirtyBitmapOrStr,
  blockDirtyBitmapRemove,
  lookupDirtyBitmap,
} from './dirty-bitmap-ops.ts';
export {
  type BdrvChild,
  type BlockDriver,
  type ChildNode,
  type ChildSpec,
  type DriverInstance,
  defineDriver,
  type EngineLike,
  type FileRange,
  type FilterInstance,
  type FilterRequest,
  type FormatInstance,
  type Limits,
  type MapIntent,
  type Mapping,
  type OpenContext,
  type PersistentBitmapStore,
  type ProtocolInstance,
  type ProtocolStatus,
  type Status,
} from './driver.ts';
export { lockForCreate } from './drivers/file-lock.ts';
export { builtinDrivers } from './drivers/index.ts';
export { NbdTlsCreds } from './drivers/nbd.ts';
export {
  type AmendProgress as Qcow2AmendProgress,
  amendQcow2,
  type Qcow2AmendOptions,
} from './drivers/qcow2/amend.ts';
export {
  bitmapInfoList as qcow2BitmapInfoList,
  type Qcow2BitmapInfo,
} from './drivers/qcow2/bitmap-directory.ts';
export type { Qcow2CheckResult } from './drivers/qcow2/check.ts';
export { checkQcow2 } from './drivers/qcow2/check.ts';
export {
  checkQcow2CreateOptions,
  createQcow2,
  type Qcow2CreateOptions,
  type Qcow2CreateProgress,
} from './drivers/qcow2/create.ts';
export { parseHeader as parseQcow2Header, type Qcow2Header } from './drivers/qcow2/header.ts';
export {
  checkQcow2Image,
  Qcow2CheckFailed,
  type Qcow2CheckFix,
  type Qcow2ImageCheck,
} from './drivers/qcow2/repair.ts';
export {
  applySnapshot as applyQcow2Snapshot,
  createSnapshot as createQcow2Snapshot,
  deleteSnapshot as deleteQcow2Snapshot,
  listSnapshots as listQcow2Snapshots,
  type Qcow2Snapshot,
  Qcow2SnapshotNotFound,
  type SnapshotSelector as Qcow2SnapshotSelector,
  withQcow2File,
} from './drivers/qcow2/snapshot.ts';
export { createRbd, type RbdLocation } from './drivers/rbd.ts';
export { THROTTLE_LIMIT_KEYS } from './drivers/throttle.ts';
export {
  BackingChainError,
  BlockError,
  BlockErrorCode,
  type BlockErrorCodeValue,
  BlockIoError,
  BlockOptionError,
  ImageLockError,
  Qcow2CorruptError,
  Qcow2Error,
  Qcow2ErrorCode,
  Qcow2UnsupportedError,
  RbdError,
  RbdErrorCode,
  toBlockError,
} from './errors.ts';
export { bitmapExtents, type ExportedBitmaps, exportDirtyBitmaps } from './export-bitmaps.ts';
export {
  type AddOptions,
  BlockGraph,
  type BlockGraphOptions,
  type NodeInfo,
} from './graph.ts';
export {
  debugQueryBlockGraph,
  type XDbgBlockGraph,
  type XDbgBlockGraphEdge,
  type XDbgBlockGraphNode,
} from './graph-debug.ts';
export type { DrainObserver, DrainScope } from './graph-lock.ts';
export { hostOffset } from './host-offset.ts';
export { changeBackingFile, makeEmpty } from './image-edit.ts';
export {
  type BackupAction,
  type BlockdevBackupOptions,
  blockdevBackup,
  blockdevBackupPrepare,
  type DriveBackupOptions,
  driveBackup,
  driveBackupPrepare,
} from './jobs/backup.ts';
export {
  type BlockdevOnError,
  type BlockJob,
  type BlockJobCommonOptions,
  type BlockJobInfo,
  type BlockJobIoStatus,
  blockJobs,
  findBlockJob,
} from './jobs/block-job.ts';
export { type BlockCommitOptions, blockCommit } from './jobs/commit.ts';
export {
  type BlockdevCreateOptions,
  blockdevCreate,
  blockdevCreateOptions,
} from './jobs/create.ts';
export {
  type BlockdevMirrorOptions,
  blockdevMirror,
  type DriveMirrorOptions,
  driveMirror,
  type MirrorSyncMode,
} from './jobs/mirror.ts';
export { type BlockResizeOptions, blockResize } from './jobs/resize.ts';
export {
  type BlockdevSnapshotSyncOptions,
  blockdevSnapshot,
  blockdevSnapshotSync,
} from './jobs/snapshot.ts';
export { type BlockStreamOptions, blockStream } from './jobs/stream.ts';
export type { GraphEvent } from './node.ts';
export {
  ACCT_TYPES,
  type AcctCounters,
  type AcctType,
  BlockAcctStats,
  LATENCY_BUCKETS,
} from './node-stats.ts';
export {
  checkObjectOptions,
  type IoThreadSettings,
  type ObjectInfo,
  type ObjectOptions,
  ObjectRegistry,
  type ObjectType,
  type ObjectValues,
  objectOptions,
  type Secret,
} from './objects.ts';
export type { BlockdevOptions } from './options.ts';
export type { ChildRole, PermissionName } from './permissions.ts';
export type {
  Infer,
  InferMembers,
  Member,
  Members,
  Optional,
  OptionSyntax,
  StructType,
  Type,
  TypeInfo,
} from './schema.ts';
// The option schema (schema.ts): definitions under `schema`, the types by name.
export * as schema from './schema.ts';
export {
  bitmapAddPrepare,
  bitmapClearPrepare,
  bitmapEnablePrepare,
  bitmapMergePrepare,
  bitmapRemovePrepare,
  type PreparedAction,
  snapshotPrepare,
  snapshotSyncPrepare,
} from './transaction.ts';
