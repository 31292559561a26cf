// What a FUSE export serves: the ExportTarget shape of @vmdisk/nbd (a block-graph
// BlockBackend has it), restated here so that no export package imports another, plus
// the two things only a file needs: a size that can change (truncate, and writes past the
// end of a growable export) and the storage it takes (st_blocks).
//
// A target fails a request by rejecting with an Error whose `errnoName` (or, for Node
// system errors, `code`) is an errno name; the kernel gets that errno, EIO for anything
// else. Requests may run concurrently; a buffer given to read or write is the target's only
// until the promise settles.

export interface FuseTarget {
  /** The size in bytes, as of now. */
  size(): number;
  /** Fills `buf` with the bytes at `offset` (the whole of it, within the size). */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Writes `buf` at `offset`, within the size. Absent: the target is read-only. */
  write?(offset: number, buf: Uint8Array, flags: { fua?: boolean }): Promise<void>;
  /** Makes completed writes durable. */
  flush?(): Promise<void>;
  /**
   * Writes zeros over a range within the size; `noHole` false lets it deallocate, and
   * `fastZero` asks to fail with ENOTSUP rather than write zero buffers (punching a hole).
   */
  writeZeroes?(
    offset: number,
    length: number,
    flags: { noHole?: boolean; fastZero?: boolean },
  ): Promise<void>;
  /** Allocation of a range (SEEK_DATA/SEEK_HOLE): extents from `offset`, in order. */
  blockStatus?(
    offset: number,
    length: number,
    options?: { wantZero?: boolean },
  ): Promise<{ length: number; hole: boolean }[]>;
  /** A buffer for a read of `length` bytes, given back with releaseBuffer. */
  allocBuffer?(length: number): Uint8Array;
  releaseBuffer?(buf: Uint8Array): void;
  /** Sets the size. Absent: the size cannot change (EACCES, as for a read-only node). */
  truncate?(size: number): Promise<void>;
  /** Bytes the target takes on its storage (st_blocks); undefined: unknown (the size). */
  allocatedSize?(): Promise<number | undefined>;
  /** I/O constraints; `minimum` is reported as st_blksize. */
  readonly blockSize?: { minimum: number; preferred: number; maximum: number };
}
