// The qcow2 core: an open image over a Qcow2File, with reads, writes, write-zeroes,
// discard, block status, flush and close. The graph adapter (qcow2.ts) wraps it. This is
// the facade; the work is in functions over the image's state (state.ts), split as QEMU
// splits qcow2: open.ts (qcow2.c's open), mapping.ts and allocation.ts (qcow2-cluster.c),
// zero.ts, flush.ts (qcow2-cache.c's write-back, qcow2-refcount.c's frees), overlap.ts
// (metadata overlap checks), compressed.ts.
//
// Crash safety (what a crash at any point leaves behind is at worst leaked clusters):
// - allocation raises refcounts in the refcount cache before the L2 entry is set; data is
//   written before the L2 entry is set;
// - a metadata flush snapshots dirty L2 tables and L1 entries, then writes refcount blocks,
//   flushes, writes L2 tables, flushes, writes L1 entries, flushes (L2 before L1 because a
//   new L2 table must be on disk before the L1 entry points at it);
// - clusters are freed (refcount dropped) only after the L2 change that unreferenced them is
//   on disk, and only once every request that might still use them has finished, so a freed
//   cluster is never reused while something (on disk or in flight) still refers to it;
// - with lazy refcounts the dirty bit is set (and flushed) before the first metadata change;
//   a dirty image opened read-write has its refcounts rebuilt from L1/L2 first.
//
// Concurrency: reads and in-place writes of allocated clusters run in parallel without locks;
// allocating writes, write-zeroes and discard lock the guest clusters they change (per
// cluster, in ascending order); creating an L2 table locks its L1 index; the refcount
// manager serialises its own updates. No lock is held over data I/O other than the cluster
// locks of the clusters being allocated.

import { Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { mapWrite, mapWriteAllocCached, mapWriteCached, write } from './allocation.ts';
import { checkQcow2, type Qcow2CheckResult } from './check.ts';
import type { Geometry } from './cluster-map.ts';
import { writeCompressed } from './compressed.ts';
import { flushMetadata, writeBack } from './flush.ts';
import { Incompat, parseHeader, peekClusterBits, type Qcow2Header } from './header.ts';
import { blockStatus, mapRead, mapReadCached, read } from './mapping.ts';
import { openImage } from './open.ts';
import type { RefcountManager } from './refcount.ts';
import { changeBackingFile, resizeQcow2 } from './resize.ts';
import { Qcow2State, writeHeader } from './state.ts';
import {
  ioBuffer,
  type Qcow2BackingReader,
  type Qcow2Extent,
  type Qcow2File,
  type Qcow2OpenOptions,
  type Qcow2ReadMapping,
  type Qcow2WriteMapping,
  releaseIoBuffer,
} from './types.ts';
import { discard, makeEmpty, writeZeroes } from './zero.ts';

export type { Qcow2Extent, Qcow2OpenOptions, Qcow2ReadMapping, Qcow2WriteMapping };

/** Opens a qcow2 image. See Qcow2OpenOptions; errors name the refused feature. */
export async function openQcow2(
  file: Qcow2File,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2Image> {
  const first = new Uint8Array(512);
  const n0 = await file.read(first, 0);
  const bits = peekClusterBits(first.subarray(0, n0));
  const cluster = ioBuffer(file, 2 ** bits);
  let header: Qcow2Header;
  try {
    const n = await file.read(cluster, 0);
    header = parseHeader(cluster.subarray(0, n));
  } finally {
    releaseIoBuffer(file, cluster);
  }
  const image = new Qcow2Image(new Qcow2State(file, header, options));
  await openImage(image.state);
  return image;
}

export class Qcow2Image {
  /** @internal The image's state, for the modules that work on it. */
  readonly state: Qcow2State;
  readonly file: Qcow2File;
  readonly header: Qcow2Header;
  readonly geom: Geometry;
  readonly readOnly: boolean;
  readonly clusterSize: number;
  readonly lazyRefcounts: boolean;

  /** Use openQcow2(). */
  constructor(state: Qcow2State) {
    this.state = state;
    this.file = state.file;
    this.header = state.header;
    this.geom = state.geom;
    this.readOnly = state.readOnly;
    this.clusterSize = state.clusterSize;
    this.lazyRefcounts = state.lazyRefcounts;
  }

  /** Virtual disk size in bytes (block_resize changes it). */
  get virtualSize(): number {
    return this.state.header.size;
  }

  /** Sets the virtual size (see resize.ts). Precondition: no request in flight. */
  resize(size: number): Promise<void> {
    return resizeQcow2(this.state, size);
  }

  /** Writes another backing file name and format into the header (null: none). */
  changeBackingFile(filename: string | null, format: string | null): Promise<void> {
    return changeBackingFile(this.state, filename, format);
  }

  /** The virtual size (so that an image is a Qcow2BackingReader of another). */
  async size(): Promise<number> {
    return this.virtualSize;
  }

  get backing(): Qcow2BackingReader | null {
    return this.state.backing;
  }

  /** Another backing file (or none) from now on, of that size: the graph changed it. */
  setBacking(reader: Qcow2BackingReader | null, size: number): void {
    this.state.backing = reader;
    this.state.backingSize = reader ? size : 0;
  }

  /** Whether the image was found corrupt while open (writes are refused from then on). */
  get corrupt(): boolean {
    return this.state.corrupt;
  }

  /** @internal The refcount manager (replaced when refcounts are rebuilt). */
  get refcounts(): RefcountManager {
    return this.state.refcounts;
  }

  /**
   * Reads guest bytes [offset, offset + buf.length) into `buf`.
   * Precondition: the range is within the disk (the generic layer checks bounds).
   */
  read(buf: Uint8Array, offset: number): Promise<void> {
    return read(this.state, buf, offset);
  }

  /** Block status of [offset, offset + length), coalesced. Precondition: within the disk. */
  blockStatus(offset: number, length: number): Promise<Qcow2Extent[]> {
    return blockStatus(this.state, offset, length);
  }

  /**
   * Writes `buf` at guest `offset` as the graph does: map, write the data (with the rest of
   * a new allocation unit filled by copy on write), then commit, or abort on failure.
   * Precondition: the range is within the disk.
   */
  write(buf: Uint8Array, offset: number): Promise<void> {
    return write(this.state, buf, offset);
  }

  /**
   * Writes one guest cluster compressed (as `qemu-img convert -c` does): `data` is the
   * whole cluster (the last one of the disk may be shorter: it is padded with zeros). Data
   * that does not compress below a cluster is written as a normal cluster.
   * Precondition: `offset` cluster aligned, within the disk.
   */
  writeCompressed(data: Uint8Array, offset: number): Promise<void> {
    return writeCompressed(this.state, data, offset);
  }

  /**
   * mapRead answered synchronously from the cache: null when the L2 table is not cached
   * (then use mapRead). Precondition as mapRead.
   */
  mapReadCached(offset: number, length: number): Qcow2ReadMapping | null {
    return mapReadCached(this.state, offset, length);
  }

  /**
   * Where guest [offset, offset + length) lives, from offset on (one answer, stopping where
   * the kind or host contiguity changes or at an L2 table boundary). Precondition: within
   * the disk, length > 0.
   */
  mapRead(offset: number, length: number): Promise<Qcow2ReadMapping> {
    return mapRead(this.state, offset, length);
  }

  /**
   * mapWrite answered synchronously when the range starts in clusters that are written in
   * place (L2 table cached, allocated, refcount one), or in fresh clusters allocated from
   * cached metadata without waiting; null otherwise (then use mapWrite).
   */
  mapWriteCached(offset: number, length: number): Qcow2WriteMapping | null {
    return (
      mapWriteCached(this.state, offset, length) ?? mapWriteAllocCached(this.state, offset, length)
    );
  }

  /**
   * Maps a guest write (see Qcow2WriteMapping), allocating where needed. The answer covers
   * at least one byte; the caller asks again for the rest. Precondition: within the disk,
   * length > 0, image writable.
   */
  mapWrite(offset: number, length: number): Promise<Qcow2WriteMapping> {
    return mapWrite(this.state, offset, length);
  }

  /**
   * Makes [offset, offset + length) read as zeros (see zero.ts). With `mayUnmap` the host
   * clusters of whole zeroed clusters are freed, otherwise kept (preallocated).
   * Precondition: within the disk.
   */
  writeZeroes(offset: number, length: number, opts: { mayUnmap?: boolean } = {}): Promise<void> {
    return writeZeroes(this.state, offset, length, opts);
  }

  /** Discards [offset, offset + length) (see zero.ts). Precondition: within the disk. */
  discard(offset: number, length: number): Promise<void> {
    return discard(this.state, offset, length);
  }

  /** Deallocates every cluster (see zero.ts makeEmpty). */
  makeEmpty(): Promise<void> {
    return makeEmpty(this.state);
  }

  /** Writes back metadata in crash-safe order and flushes the file. */
  async flush(): Promise<void> {
    const s = this.state;
    if (s.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
    if (s.readOnly) return;
    await flushMetadata(s);
  }

  /** Number of clusters freed but not yet returned to the refcounts. */
  get pendingFrees(): number {
    return this.state.pendingFrees.length;
  }

  /**
   * Writes everything back, clears the dirty bit, flushes and closes. Precondition: no
   * request in flight. The file is not closed (its owner does that).
   */
  async close(): Promise<void> {
    const s = this.state;
    if (s.closed) return;
    if (!s.readOnly && !s.corrupt) {
      await writeBack(s);
      if (s.header.incompatibleFeatures & Incompat.DIRTY) {
        s.header.incompatibleFeatures &= ~Incompat.DIRTY;
        await writeHeader(s);
      }
    }
    s.closed = true;
    s.l2Cache.clear();
    s.refcounts.close();
  }

  /**
   * Checks the image (refcounts against references, as checkQcow2). An image open for
   * writing is written back first, freed clusters returned, so that only real problems
   * show. Precondition: no request in flight.
   */
  async check(): Promise<Qcow2CheckResult> {
    const s = this.state;
    if (s.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
    if (!s.readOnly && !s.corrupt) await writeBack(s);
    return checkQcow2(s.file);
  }

  /** The L1 table as it is in memory (offsets without flags). For check and tests. */
  get l1Table(): readonly number[] {
    return this.state.l1;
  }
}
