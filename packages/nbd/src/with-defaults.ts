// What the server emulates for a target that lacks a feature, in one place (as nbdkit's
// backend fills in what a plugin leaves out): withDefaults(target) returns a complete
// target that adds only what the target lacks, so the transmission code calls it without
// asking what it has.
//
//   FUA            a write (trim, write-zeroes) without FUA, then a flush (nativeFua unset)
//   flush          nothing to do (absent: the target has no cache of its own)
//   write-zeroes   writes of a zero buffer (fastZero: ENOTSUP, it would not be fast)
//   trim           nothing (trim is advisory; not advertised, refused as the spec says)
//   cache          nothing (not advertised, refused)
//   block status   all data (the spec's answer for a server that knows nothing)
//   dirty bitmaps  none offered; a bitmap's extents are cut to the range and merged
//   sparse read    block status (only what is cheap to know), then reads of the data
//   large requests trim, write-zeroes and cache are split at the maximum block size (a
//                  target's precondition), block status is cut to the range asked
//
// What the target does natively is in `features`, for what the server advertises.

import type {
  BitmapExtent,
  BlockSizeConstraints,
  BlockStatusOptions,
  ExportBitmap,
  ExportTarget,
  Extent,
  SparsePiece,
  WriteFlags,
  WriteZeroesFlags,
} from './export-target.ts';

/** What the target does itself (the rest is emulated or refused). */
export interface TargetFeatures {
  /** NBD_CMD_TRIM (SEND_TRIM). */
  readonly trim: boolean;
  /** Write-zeroes natively, so NBD_CMD_FLAG_FAST_ZERO can be honoured (SEND_FAST_ZERO). */
  readonly fastZero: boolean;
  /** NBD_CMD_CACHE (SEND_CACHE). */
  readonly cache: boolean;
  /** Block status: a sparse READ may look for holes. */
  readonly blockStatus: boolean;
  /** qemu:allocation-depth may be offered. */
  readonly depth: boolean;
  readonly multiConnSafe: boolean;
  /** The names of the dirty bitmaps offered as qemu:dirty-bitmap:NAME, in order. */
  readonly dirtyBitmaps: readonly string[];
}

/** A target with every operation; what it lacked is emulated (see above). */
export interface CompleteTarget extends ExportTarget {
  readonly features: TargetFeatures;
  write(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, flags: WriteFlags): Promise<void>;
  writeZeroes(offset: number, length: number, flags: WriteZeroesFlags): Promise<void>;
  /** Extents covering exactly [offset, offset + min(length, maximum)), never none. */
  blockStatus(offset: number, length: number, options?: BlockStatusOptions): Promise<Extent[]>;
  cache(offset: number, length: number): Promise<void>;
  /**
   * Dirty bitmap `index` (of features.dirtyBitmaps) over [offset, offset + length): extents
   * from `offset`, cut to the range, neighbours of the same state merged, never none.
   */
  bitmapStatus(index: number, offset: number, length: number): Promise<BitmapExtent[]>;
  /** Pieces checked to cover the range exactly, adjacent holes merged. */
  readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]>;
}

/** Zero buffers for emulated write-zeroes are at most this big. */
const ZERO_BUFFER = 1024 * 1024;
const NO_FUA: WriteFlags = Object.freeze({ fua: false });

const EMPTY = new Uint8Array(0);

const errnoError = (errnoName: string, message: string): Error =>
  Object.assign(new Error(message), { errnoName });

/** A target's pieces, checked to cover [offset, offset + length) in order; holes merged. */
function checkPieces(offset: number, length: number, pieces: SparsePiece[]): SparsePiece[] {
  const out: SparsePiece[] = [];
  let pos = offset;
  for (const p of pieces) {
    const bad =
      p.offset !== pos ||
      !(p.length > 0) ||
      (p.data !== undefined && p.data.length !== p.length) ||
      p.offset + p.length > offset + length;
    if (bad)
      throw errnoError('EIO', `the target's sparse read of ${length} at ${offset} is malformed`);
    const last = out[out.length - 1];
    if (p.data === undefined && last !== undefined && last.data === undefined)
      last.length += p.length;
    else out.push(p.data === undefined ? { offset: p.offset, length: p.length } : p);
    pos += p.length;
  }
  if (pos !== offset + length) {
    throw errnoError('EIO', `the target's sparse read of ${length} at ${offset} is short`);
  }
  return out;
}

/** Extents of a bitmap cut to `length`, merged; an EIO error when they cover nothing. */
function checkBitmapExtents(extents: readonly BitmapExtent[], length: number): BitmapExtent[] {
  const out: BitmapExtent[] = [];
  let covered = 0;
  for (const e of extents) {
    const n = Math.min(e.length, length - covered);
    if (!(n > 0)) break;
    const last = out[out.length - 1];
    if (last !== undefined && last.dirty === e.dirty) last.length += n;
    else out.push({ length: n, dirty: e.dirty });
    covered += n;
  }
  if (out.length === 0) throw errnoError('EIO', 'the dirty bitmap reported no extent');
  return out;
}

/**
 * `target` completed; `blockSize` is what the export advertises, `bitmaps` the dirty
 * bitmaps it offers (the target's own when not given).
 */
export function withDefaults(
  target: ExportTarget,
  blockSize: BlockSizeConstraints,
  bitmaps: readonly ExportBitmap[] = target.dirtyBitmaps ?? [],
  offerDepth = true,
): CompleteTarget {
  const t = target;
  const max = blockSize.maximum;
  const nativeFua = t.nativeFua === true;

  const flush = t.flush ? () => t.flush!() : () => Promise.resolve();

  /**
   * Runs `op` (given whether to pass FUA down), then a flush when FUA is emulated. Not an
   * async function: without the flush, `op`'s own promise is the answer (no extra hop
   * per write).
   */
  const fuaThen = (fua: boolean | undefined, op: (fua: boolean) => Promise<void>) => {
    try {
      if (fua && !nativeFua) return Promise.resolve(op(false)).then(flush);
      return op(fua === true);
    } catch (err) {
      return Promise.reject(err);
    }
  };

  /** A length-only command split at the maximum block size. */
  const inPieces = async (
    offset: number,
    length: number,
    fn: (offset: number, length: number) => Promise<void>,
  ): Promise<void> => {
    const end = offset + length;
    for (let pos = offset; pos < end; pos += max) await fn(pos, Math.min(max, end - pos));
  };

  const write = (offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void> => {
    if (!t.write) return Promise.reject(errnoError('EPERM', 'the target is read-only'));
    return fuaThen(flags.fua, (fua) => t.write!(offset, buf, fua ? flags : NO_FUA));
  };

  const writeZeroBuffers = async (offset: number, length: number, fua: boolean) => {
    const zeros = Buffer.alloc(Math.min(length, ZERO_BUFFER, max));
    const end = offset + length;
    for (let pos = offset; pos < end; pos += zeros.length) {
      const n = Math.min(zeros.length, end - pos);
      await t.write!(pos, n === zeros.length ? zeros : zeros.subarray(0, n), { fua });
    }
  };

  const writeZeroes = (offset: number, length: number, flags: WriteZeroesFlags) =>
    fuaThen(flags.fua, (fua) => {
      if (t.writeZeroes) {
        const f = { fua, noHole: !!flags.noHole, fastZero: !!flags.fastZero };
        return inPieces(offset, length, (o, n) => t.writeZeroes!(o, n, f));
      }
      if (flags.fastZero) throw errnoError('ENOTSUP', 'zeroing would not be fast');
      if (!t.write) throw errnoError('EPERM', 'the target is read-only');
      return writeZeroBuffers(offset, length, fua);
    });

  const trim = (offset: number, length: number, flags: WriteFlags) =>
    fuaThen(flags.fua, async (fua) => {
      if (t.trim) await inPieces(offset, length, (o, n) => t.trim!(o, n, { fua }));
    });

  const cache = async (offset: number, length: number): Promise<void> => {
    if (t.cache) await inPieces(offset, length, (o, n) => t.cache!(o, n));
  };

  const blockStatus = async (
    offset: number,
    length: number,
    options?: BlockStatusOptions,
  ): Promise<Extent[]> => {
    const want = Math.min(length, max);
    const out: Extent[] = [];
    if (t.blockStatus) {
      let covered = 0;
      for (const e of await t.blockStatus(offset, want, options)) {
        const n = Math.min(e.length, want - covered);
        if (!(n > 0)) continue;
        out.push(n === e.length ? e : { ...e, length: n });
        covered += n;
        if (covered >= want) break;
      }
    }
    // A target that says nothing useful: the range reads as data.
    if (out.length === 0) out.push({ length: want, hole: false, zero: false });
    return out;
  };

  /** Block status, then the data extents read (all settled before this settles). */
  const statusThenRead = async (
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> => {
    const pieces: SparsePiece[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      for (const e of await blockStatus(pos, end - pos, { wantZero: false })) {
        const last = pieces[pieces.length - 1];
        if (last !== undefined && (last.data === undefined) === e.zero) last.length += e.length;
        else pieces.push({ offset: pos, length: e.length, ...(!e.zero && { data: EMPTY }) });
        pos += e.length;
      }
    }
    const reads: Promise<void>[] = [];
    for (const p of pieces) {
      if (p.data === undefined) continue;
      p.data = alloc(p.length);
      try {
        reads.push(t.read(p.offset, p.data));
      } catch (err) {
        reads.push(Promise.reject(err));
      }
    }
    const failed = (await Promise.allSettled(reads)).find((r) => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    return pieces;
  };

  const readSparse = async (
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> => {
    if (!t.readSparse) return statusThenRead(offset, length, alloc);
    return checkPieces(offset, length, await t.readSparse(offset, length, alloc));
  };

  const bitmapList = [...bitmaps];
  const bitmapStatus = async (
    index: number,
    offset: number,
    length: number,
  ): Promise<BitmapExtent[]> => {
    const bitmap = bitmapList[index];
    if (bitmap === undefined) throw errnoError('EINVAL', `no dirty bitmap ${index}`);
    return checkBitmapExtents(await bitmap.status(offset, length), length);
  };

  const complete: CompleteTarget = {
    features: {
      trim: t.trim !== undefined,
      fastZero: t.writeZeroes !== undefined,
      cache: t.cache !== undefined,
      blockStatus: t.blockStatus !== undefined || t.readSparse !== undefined,
      depth: offerDepth && t.reportsDepth === true && t.blockStatus !== undefined,
      multiConnSafe: t.multiConnSafe === true,
      dirtyBitmaps: bitmapList.map((b) => b.name),
    },
    size: () => t.size(),
    read: (offset, buf) => t.read(offset, buf),
    write,
    flush,
    trim,
    writeZeroes,
    blockStatus,
    cache,
    bitmapStatus,
    readSparse,
    nativeFua: true,
    ...(t.multiConnSafe !== undefined && { multiConnSafe: t.multiConnSafe }),
    ...(t.reportsDepth !== undefined && { reportsDepth: t.reportsDepth }),
    ...(t.blockSize !== undefined && { blockSize: t.blockSize }),
    dirtyBitmaps: bitmapList,
  };
  if (t.fileRange) {
    // Not emulated: without it, the server reads.
    complete.fileRange = (offset, length) => t.fileRange!(offset, length);
  }
  if (t.allocBuffer) {
    // Buffers are the target's memory (e.g. aligned for O_DIRECT): not emulated.
    complete.allocBuffer = (n) => t.allocBuffer!(n);
    complete.releaseBuffer = (b) => t.releaseBuffer?.(b);
  }
  return complete;
}
