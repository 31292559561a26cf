// The state of an open qcow2 image (QEMU's BDRVQcow2State): geometry, the L1 table, the L2
// and refcount caches, the locks, and the bookkeeping of requests in flight and of freed
// clusters. The other modules are functions over it (mapping, allocation, zero, flush,
// overlap, compressed); image.ts is the facade.

import { badOption, Qcow2CorruptError, Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { Geometry } from './cluster-map.ts';
import { Compat, Incompat, type Qcow2Header, serializeHeader } from './header.ts';
import type { MetadataCache } from './l2-cache.ts';
import { KeyedLocks, Mutex } from './lock.ts';
import type { RefcountManager } from './refcount.ts';
import type { Qcow2BackingReader, Qcow2File, Qcow2OpenOptions } from './types.ts';

/** A cluster freed (by the L2 change of generation `gen`), returned once that is on disk. */
export interface PendingFree {
  offset: number;
  bytes: number;
  gen: number;
  /** A guest discard (or unmapping zero write) freed it: pass the discard to the file. */
  passDown: boolean;
}

export class Qcow2State {
  readonly file: Qcow2File;
  readonly header: Qcow2Header;
  readonly geom: Geometry;
  readonly readOnly: boolean;
  readonly clusterSize: number;
  readonly lazyRefcounts: boolean;
  readonly options: Qcow2OpenOptions;
  backing: Qcow2BackingReader | null = null;
  backingSize = 0;
  l1: number[] = [];
  l1Copied: boolean[] = [];
  readonly l1Dirty = new Set<number>();
  /** Host offsets of every L2 table (for the overlap checks). */
  readonly l2Offsets = new Set<number>();
  l2Cache!: MetadataCache;
  /** Replaced when refcounts are rebuilt. */
  refcounts!: RefcountManager;
  /** Guest clusters being allocated, zeroed or discarded. */
  readonly clusterLocks = new KeyedLocks();
  /** L1 indexes whose L2 table is being created. */
  readonly l2Locks = new KeyedLocks();
  readonly flushMutex = new Mutex();
  readonly headerMutex = new Mutex();
  /** Serialises byte allocation for compressed clusters with the return of freed clusters. */
  readonly bytesMutex = new Mutex();
  /** Where the next compressed cluster may go: the rest of a host cluster already in use. */
  byteTail: { offset: number; end: number } | null = null;
  pendingFrees: PendingFree[] = [];
  /** Generation of requests: a free waits for every request of an older generation. */
  gen = 0;
  /** Requests in flight per generation. */
  readonly active = new Map<number, number>();
  dirtyMarked = false;
  corrupt = false;
  closed = false;

  constructor(file: Qcow2File, header: Qcow2Header, options: Qcow2OpenOptions) {
    this.file = file;
    this.header = header;
    this.options = options;
    this.readOnly = options.readOnly ?? false;
    this.geom = new Geometry(
      header.clusterBits,
      (header.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n,
    );
    this.clusterSize = this.geom.clusterSize;
    this.lazyRefcounts =
      options.lazyRefcounts ?? (header.compatibleFeatures & Compat.LAZY_REFCOUNTS) !== 0n;
    if (this.lazyRefcounts && header.version < 3) {
      throw badOption('lazy refcounts need a compat=1.1 (version 3) image');
    }
  }
}

export const MiB = 1024 * 1024;

/** Writes the whole header cluster and flushes. */
export function writeHeader(s: Qcow2State): Promise<void> {
  return s.headerMutex.run(async () => {
    await s.file.write(serializeHeader(s.header), 0);
    await s.file.flush();
  });
}

export function enter(s: Qcow2State): number {
  if (s.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
  const g = s.gen;
  s.active.set(g, (s.active.get(g) ?? 0) + 1);
  return g;
}

export function leave(s: Qcow2State, g: number): void {
  const c = (s.active.get(g) ?? 1) - 1;
  if (c === 0) s.active.delete(g);
  else s.active.set(g, c);
}

export function minActive(s: Qcow2State): number {
  let m = Number.POSITIVE_INFINITY;
  for (const g of s.active.keys()) if (g < m) m = g;
  return m;
}

export function freeLater(s: Qcow2State, offset: number, bytes: number, passDown = false): void {
  s.pendingFrees.push({ offset, bytes, gen: s.gen, passDown });
  s.gen++;
}

export function checkWritable(s: Qcow2State): void {
  if (s.readOnly) throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, 'qcow2 image is open read-only');
  if (s.corrupt)
    throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, 'qcow2 image was found corrupt: writes refused');
}

export async function beforeMetadataChange(s: Qcow2State): Promise<void> {
  if (!s.lazyRefcounts || s.dirtyMarked) return;
  await s.headerMutex.run(async () => {
    if (s.dirtyMarked) return;
    s.header.incompatibleFeatures |= Incompat.DIRTY;
    await s.file.write(serializeHeader(s.header), 0);
    await s.file.flush();
    s.dirtyMarked = true;
  });
}

export async function markCorrupt(s: Qcow2State, message: string): Promise<never> {
  s.corrupt = true;
  if (!s.readOnly && s.header.version === 3) {
    s.header.incompatibleFeatures |= Incompat.CORRUPT;
    try {
      await writeHeader(s);
    } catch {
      // The original error matters more.
    }
  }
  throw new Qcow2CorruptError(message);
}
