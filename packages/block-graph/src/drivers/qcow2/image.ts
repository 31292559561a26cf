// The qcow2 core: an open image over a Qcow2File, with reads, writes, write-zeroes,
// discard, block status, flush and close. The graph adapter (qcow2.ts) wraps it.
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

import {
  badOption,
  Qcow2CorruptError,
  Qcow2Error,
  Qcow2ErrorCode,
  Qcow2UnsupportedError,
} from '../../errors.ts';
import { checkQcow2, computeReferences, type Qcow2CheckResult, rebuildRefcounts } from './check.ts';
import {
  decodeL2,
  encodeL1,
  encodeL2,
  encodeL2Compressed,
  Geometry,
  type L2Entry,
  parseL1,
  UNALLOCATED,
} from './cluster-map.ts';
import { compressCluster, decompressCluster, encodeCompressed } from './compress.ts';
import {
  Compat,
  Incompat,
  KNOWN_INCOMPAT,
  parseHeader,
  peekClusterBits,
  type Qcow2Header,
  serializeHeader,
} from './header.ts';
import { type CacheEntry, MetadataCache } from './l2-cache.ts';
import { KeyedLocks, Mutex } from './lock.ts';
import { RefcountManager } from './refcount.ts';
import type { Qcow2BackingReader, Qcow2File } from './types.ts';

export interface Qcow2OpenOptions {
  /** Open read-only (default false). */
  readOnly?: boolean;
  /**
   * The backing disk: a reader, or null for none (reads of unallocated clusters then give
   * zeros). Required (possibly null) when the header names a backing file.
   */
  backing?: Qcow2BackingReader | null;
  /** Bytes of L2 tables cached (QEMU's l2-cache-size); default: enough for the whole disk, at most 32 MiB. */
  l2CacheSize?: number;
  /** Bytes of refcount blocks cached (QEMU's refcount-cache-size); default 4 clusters' worth or 256 KiB. */
  refcountCacheSize?: number;
  /** Defer refcount updates under the dirty bit (default: the image's lazy_refcounts bit). */
  lazyRefcounts?: boolean;
  /** Pending freed clusters that trigger a metadata flush (default 1024). */
  discardBatch?: number;
}

/** Where the first bytes of a guest range live, for a map()-based caller (the graph). */
export interface Qcow2ReadMapping {
  /** Bytes from the asked offset this answer covers (> 0). */
  length: number;
  /** compressed: only readable through Qcow2Image.read (the data must be decompressed). */
  kind: 'data' | 'zero' | 'unallocated' | 'compressed';
  /** For data: the offset in the image file. */
  host?: number;
}

/**
 * Where a guest write goes, for a map()-based caller: write the bytes at `host` (for
 * `length` bytes from the asked offset). With `allocation`, the caller writes the whole
 * unit [start, end) of guest bytes to `host - (asked offset - start)` on, filling what lies
 * outside its write with what the range read as before (`from`: 'below' = the backing
 * disk, zeros past its end or without one; 'zero' = zeros), then calls commit() (or
 * abort() if that write failed). Exactly one of commit/abort must be called: until then
 * the clusters of the unit stay locked.
 */
export interface Qcow2WriteMapping {
  length: number;
  host: number;
  allocation: {
    start: number;
    end: number;
    from: 'below' | 'zero';
    commit(): Promise<void>;
    abort(error?: unknown): Promise<void>;
  };
}

/** One extent of block status. */
export interface Qcow2Extent {
  offset: number;
  length: number;
  /** data: in the image file; zero: reads as zeros; unallocated: from the backing (or zeros). */
  status: 'data' | 'zero' | 'unallocated';
  /** For data that is not compressed: where it is in the image file. */
  hostOffset?: number;
  compressed?: boolean;
}

type Segment =
  | { kind: 'data'; guest: number; length: number; host: number }
  | { kind: 'zero'; guest: number; length: number }
  | { kind: 'backing'; guest: number; length: number }
  | { kind: 'compressed'; guest: number; length: number; entry: L2Entry; within: number };

/** What mapRead answers for the first segment of a range. */
function readMappingOf(s: Segment): Qcow2ReadMapping {
  switch (s.kind) {
    case 'data':
      return { length: s.length, kind: 'data', host: s.host };
    case 'zero':
      return { length: s.length, kind: 'zero' };
    case 'backing':
      return { length: s.length, kind: 'unallocated' };
    default:
      return { length: s.length, kind: 'compressed' };
  }
}

interface PendingFree {
  offset: number;
  bytes: number;
  gen: number;
  /** A guest discard (or unmapping zero write) freed it: pass the discard to the file. */
  passDown: boolean;
}

const MiB = 1024 * 1024;

/** Opens a qcow2 image. See Qcow2OpenOptions; errors name the refused feature. */
export async function openQcow2(
  file: Qcow2File,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2Image> {
  const first = new Uint8Array(512);
  const n0 = await file.read(first, 0);
  const bits = peekClusterBits(first.subarray(0, n0));
  const cluster = new Uint8Array(2 ** bits);
  const n = await file.read(cluster, 0);
  const header = parseHeader(cluster.subarray(0, n));
  const image = new Qcow2Image(file, header, options);
  await image._open();
  return image;
}

export class Qcow2Image {
  readonly file: Qcow2File;
  readonly header: Qcow2Header;
  readonly geom: Geometry;
  readonly readOnly: boolean;
  /** Virtual disk size in bytes. */
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly lazyRefcounts: boolean;
  readonly #options: Qcow2OpenOptions;
  #backing: Qcow2BackingReader | null = null;
  #backingSize = 0;
  #l1: number[] = [];
  #l1Copied: boolean[] = [];
  #l1Dirty = new Set<number>();
  #l2Offsets = new Set<number>();
  #l2Cache!: MetadataCache;
  /** @internal The refcount manager (replaced when refcounts are rebuilt). */
  refcounts!: RefcountManager;
  readonly #clusterLocks = new KeyedLocks();
  readonly #l2Locks = new KeyedLocks();
  readonly #flushMutex = new Mutex();
  readonly #headerMutex = new Mutex();
  /** Serialises byte allocation for compressed clusters with the return of freed clusters. */
  readonly #bytesMutex = new Mutex();
  /** Where the next compressed cluster may go: the rest of a host cluster already in use. */
  #byteTail: { offset: number; end: number } | null = null;
  #pendingFrees: PendingFree[] = [];
  #gen = 0;
  readonly #active = new Map<number, number>();
  #dirtyMarked = false;
  #corrupt = false;
  #closed = false;

  /** Use openQcow2(). */
  constructor(file: Qcow2File, header: Qcow2Header, options: Qcow2OpenOptions) {
    this.file = file;
    this.header = header;
    this.#options = options;
    this.readOnly = options.readOnly ?? false;
    this.geom = new Geometry(
      header.clusterBits,
      (header.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n,
    );
    this.virtualSize = header.size;
    this.clusterSize = this.geom.clusterSize;
    this.lazyRefcounts =
      options.lazyRefcounts ?? (header.compatibleFeatures & Compat.LAZY_REFCOUNTS) !== 0n;
    if (this.lazyRefcounts && header.version < 3) {
      throw badOption('lazy refcounts need a compat=1.1 (version 3) image');
    }
  }

  /** The virtual size (so that an image is a Qcow2BackingReader of another). */
  async size(): Promise<number> {
    return this.virtualSize;
  }

  get backing(): Qcow2BackingReader | null {
    return this.#backing;
  }

  /** Whether the image was found corrupt while open (writes are refused from then on). */
  get corrupt(): boolean {
    return this.#corrupt;
  }

  /** @internal Called by openQcow2. */
  async _open(): Promise<void> {
    const h = this.header;
    const unknown = h.incompatibleFeatures & ~KNOWN_INCOMPAT;
    if (unknown !== 0n) {
      const names: string[] = [];
      for (let bit = 0; bit < 64; bit++) {
        if ((unknown >> BigInt(bit)) & 1n) {
          const f = h.featureNames.find((x) => x.type === 0 && x.bit === bit);
          names.push(f ? `${f.name} (bit ${bit})` : `unknown incompatible feature bit ${bit}`);
        }
      }
      throw new Qcow2UnsupportedError(
        names.join(', '),
        `qcow2 image uses unsupported incompatible features: ${names.join(', ')}`,
      );
    }
    if (h.cryptMethod !== 0) {
      const what =
        h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
      throw new Qcow2UnsupportedError('encryption', `qcow2 encryption (${what}) is not supported`);
    }
    if (h.incompatibleFeatures & Incompat.DATA_FILE) {
      throw new Qcow2UnsupportedError(
        'external data file',
        'qcow2 images with an external data file are not supported',
      );
    }
    if (!this.readOnly && h.incompatibleFeatures & Incompat.CORRUPT) {
      throw new Qcow2CorruptError(
        'the image is marked corrupt (corrupt bit); open it read-only or repair it with qemu-img check -r all',
      );
    }
    if (!this.readOnly && h.nbSnapshots > 0) {
      throw new Qcow2UnsupportedError(
        'internal snapshots',
        `qcow2 image has ${h.nbSnapshots} internal snapshots: only read-only access is supported`,
      );
    }
    if (h.backingFile !== null && this.#options.backing === undefined) {
      throw badOption(
        `the image has backing file '${h.backingFile}': pass 'backing' (a reader, or null for none)`,
      );
    }
    this.#backing = this.#options.backing ?? null;
    if (this.#backing) this.#backingSize = await this.#backing.size();

    const l1Bytes = new Uint8Array(h.l1Size * 8);
    if (l1Bytes.length > 0) {
      const got = await this.file.read(l1Bytes, h.l1TableOffset);
      if (got < l1Bytes.length)
        throw new Qcow2CorruptError(`L1 table at ${h.l1TableOffset} is truncated`);
    }
    const l1 = parseL1(l1Bytes);
    this.#l1 = l1.offsets;
    this.#l1Copied = l1.copied;
    for (const [i, o] of this.#l1.entries()) {
      if (o === 0) continue;
      if (o % this.clusterSize !== 0)
        throw new Qcow2CorruptError(`L1 entry ${i} (${o}) is not cluster aligned`);
      this.#l2Offsets.add(o);
    }
    const cs = this.clusterSize;
    const wholeDisk = Math.ceil(h.size / this.geom.l2Span) * cs;
    const l2Bytes = this.#options.l2CacheSize ?? Math.min(32 * MiB, Math.max(wholeDisk, 2 * cs));
    this.#l2Cache = new MetadataCache({
      capacity: Math.floor(l2Bytes / cs),
      entrySize: cs,
      load: async (offset, buf) => {
        const got = await this.file.read(buf, offset);
        if (got < buf.length)
          throw new Qcow2CorruptError(`L2 table at ${offset} is past the end of the file`);
      },
      evictDirty: () => this.#flushMetadata(),
    });
    await this.#loadRefcounts();

    if (!this.readOnly) {
      if (h.incompatibleFeatures & Incompat.DIRTY) {
        // Refcounts may be stale: rebuild them from L1/L2 before writing anything.
        await this.#rebuildRefcounts();
        h.incompatibleFeatures &= ~Incompat.DIRTY;
        await this.#writeHeader();
      }
      if (h.autoclearFeatures !== 0n) {
        // We keep no bitmaps up to date: clear every autoclear bit before writing.
        h.autoclearFeatures = 0n;
        await this.#writeHeader();
      }
    }
  }

  async #loadRefcounts(): Promise<void> {
    const h = this.header;
    const rcBytes = this.#options.refcountCacheSize ?? Math.max(4 * this.clusterSize, 256 * 1024);
    this.refcounts = await RefcountManager.load(
      this.file,
      { clusterBits: h.clusterBits, refcountOrder: h.refcountOrder },
      h.refcountTableOffset,
      h.refcountTableClusters,
      {
        cacheCapacity: Math.floor(rcBytes / this.clusterSize),
        writeHeaderReftable: async (offset, clusters) => {
          h.refcountTableOffset = offset;
          h.refcountTableClusters = clusters;
          await this.#writeHeader();
        },
      },
    );
  }

  async #rebuildRefcounts(): Promise<void> {
    const refs = await computeReferences(this.file, this.header, false);
    if (refs.errors.length > 0) {
      throw new Qcow2CorruptError(`cannot rebuild refcounts of a dirty image: ${refs.errors[0]}`);
    }
    await rebuildRefcounts(this.file, this.header, refs, () => this.#writeHeader());
    await this.#loadRefcounts();
  }

  /** Writes the whole header cluster and flushes. */
  #writeHeader(): Promise<void> {
    return this.#headerMutex.run(async () => {
      await this.file.write(serializeHeader(this.header), 0);
      await this.file.flush();
    });
  }

  // ---- request bookkeeping -------------------------------------------------------------

  #enter(): number {
    if (this.#closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
    const g = this.#gen;
    this.#active.set(g, (this.#active.get(g) ?? 0) + 1);
    return g;
  }

  #leave(g: number): void {
    const c = (this.#active.get(g) ?? 1) - 1;
    if (c === 0) this.#active.delete(g);
    else this.#active.set(g, c);
  }

  #minActive(): number {
    let m = Number.POSITIVE_INFINITY;
    for (const g of this.#active.keys()) if (g < m) m = g;
    return m;
  }

  #free(offset: number, bytes: number, passDown = false): void {
    this.#pendingFrees.push({ offset, bytes, gen: this.#gen, passDown });
    this.#gen++;
  }

  #checkWritable(): void {
    if (this.readOnly)
      throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, 'qcow2 image is open read-only');
    if (this.#corrupt)
      throw new Qcow2Error(
        Qcow2ErrorCode.READ_ONLY,
        'qcow2 image was found corrupt: writes refused',
      );
  }

  async #beforeMetadataChange(): Promise<void> {
    if (!this.lazyRefcounts || this.#dirtyMarked) return;
    await this.#headerMutex.run(async () => {
      if (this.#dirtyMarked) return;
      this.header.incompatibleFeatures |= Incompat.DIRTY;
      await this.file.write(serializeHeader(this.header), 0);
      await this.file.flush();
      this.#dirtyMarked = true;
    });
  }

  async #markCorrupt(message: string): Promise<never> {
    this.#corrupt = true;
    if (!this.readOnly && this.header.version === 3) {
      this.header.incompatibleFeatures |= Incompat.CORRUPT;
      try {
        await this.#writeHeader();
      } catch {
        // The original error matters more.
      }
    }
    throw new Qcow2CorruptError(message);
  }

  /** Whether host cluster `offset` holds metadata (QEMU's overlap check, cached mode). */
  #isMetadata(offset: number): boolean {
    const h = this.header;
    if (offset < this.clusterSize) return true;
    if (offset >= h.l1TableOffset && offset < h.l1TableOffset + h.l1Size * 8) return true;
    if (this.#l2Offsets.has(offset)) return true;
    return this.refcounts.isRefcountMetadata(offset);
  }

  async #checkDataHost(host: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    for (let c = host - (host % cs); c < host + length; c += cs) {
      if (this.#isMetadata(c)) {
        await this.#markCorrupt(`data cluster at ${c} overlaps metadata`);
      }
    }
  }

  // ---- L2 tables -------------------------------------------------------------------------

  /** The L2 table of L1 index `i`, pinned; null when there is none. */
  async #getL2(i: number): Promise<CacheEntry | null> {
    const off = this.#l1[i] ?? 0;
    if (off === 0) return null;
    if (
      off < this.clusterSize ||
      this.refcounts.isRefcountMetadata(off) ||
      (off >= this.header.l1TableOffset && off < this.header.l1TableOffset + this.header.l1Size * 8)
    ) {
      throw new Qcow2CorruptError(`L2 table ${i} at ${off} overlaps other metadata`);
    }
    return this.#l2Cache.get(off);
  }

  /** The L2 table of L1 index `i`, created if missing, pinned. Caller holds the cluster locks. */
  async #getOrCreateL2(i: number): Promise<CacheEntry> {
    const have = await this.#getL2(i);
    if (have) {
      if (!this.#l1Copied[i]) {
        const rc = await this.refcounts.get(this.#l1[i]! / this.clusterSize);
        if (rc !== 1) {
          this.#l2Cache.unpin(have);
          throw new Qcow2CorruptError(
            `L2 table ${i} is shared (refcount ${rc}); internal snapshots are not supported`,
          );
        }
        this.#l1Copied[i] = true;
        this.#l1Dirty.add(i);
      }
      return have;
    }
    await this.#l2Locks.lock(i);
    try {
      const again = await this.#getL2(i);
      if (again) return again;
      const off = await this.refcounts.allocate(1);
      if (this.#isMetadata(off))
        await this.#markCorrupt(`new L2 table at ${off} overlaps metadata`);
      const e = await this.#l2Cache.create(off);
      this.#l2Offsets.add(off);
      this.#l1[i] = off;
      this.#l1Copied[i] = true;
      this.#l1Dirty.add(i);
      return e;
    } finally {
      this.#l2Locks.unlock(i);
    }
  }

  #entryAt(l2: CacheEntry | null, ci: number): L2Entry {
    if (!l2) return UNALLOCATED;
    return decodeL2(l2.data, ci % this.geom.l2Entries, this.geom);
  }

  // ---- reads -----------------------------------------------------------------------------

  /** Segments describing guest range [offset, offset+length) within one cluster. */
  #segmentsOf(e: L2Entry, ci: number, from: number, to: number, out: Segment[]): void {
    const g = this.geom;
    const base = ci * g.clusterSize;
    if (e.compressed) {
      out.push({
        kind: 'compressed',
        guest: base + from,
        length: to - from,
        entry: e,
        within: from,
      });
      return;
    }
    let pos = from;
    while (pos < to) {
      const sc = Math.floor(pos / g.subclusterSize);
      const end = Math.min(to, (sc + 1) * g.subclusterSize);
      const bit = 2 ** sc;
      const seg: Segment =
        (e.alloc & bit) !== 0
          ? { kind: 'data', guest: base + pos, length: end - pos, host: e.host + pos }
          : (e.zero & bit) !== 0
            ? { kind: 'zero', guest: base + pos, length: end - pos }
            : { kind: 'backing', guest: base + pos, length: end - pos };
      const last = out[out.length - 1];
      if (
        last &&
        last.kind === seg.kind &&
        last.guest + last.length === seg.guest &&
        (seg.kind !== 'data' || (last.kind === 'data' && last.host + last.length === seg.host))
      ) {
        last.length += seg.length;
      } else out.push(seg);
      pos = end;
    }
  }

  /** Segments of [offset, offset + length); with `firstOnly`, stops once the first is complete. */
  async #mapRange(offset: number, length: number, firstOnly = false): Promise<Segment[]> {
    const g = this.geom;
    const out: Segment[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end && !(firstOnly && out.length > 1)) {
      const l1i = Math.floor(pos / g.l2Span);
      const chunkEnd = Math.min(end, (l1i + 1) * g.l2Span);
      const l2 = await this.#getL2(l1i);
      try {
        while (pos < chunkEnd && !(firstOnly && out.length > 1)) {
          const ci = Math.floor(pos / g.clusterSize);
          const cEnd = Math.min(chunkEnd, (ci + 1) * g.clusterSize);
          this.#segmentsOf(
            this.#entryAt(l2, ci),
            ci,
            pos - ci * g.clusterSize,
            cEnd - ci * g.clusterSize,
            out,
          );
          pos = cEnd;
        }
      } finally {
        if (l2) this.#l2Cache.unpin(l2);
      }
    }
    return out;
  }

  async #readSegment(buf: Uint8Array, s: Segment): Promise<void> {
    switch (s.kind) {
      case 'zero':
        buf.fill(0);
        return;
      case 'data': {
        const n = await this.file.read(buf, s.host);
        if (n < buf.length) buf.fill(0, n);
        return;
      }
      case 'backing': {
        const avail = this.#backing
          ? Math.max(0, Math.min(buf.length, this.#backingSize - s.guest))
          : 0;
        if (avail > 0) await this.#backing!.read(buf.subarray(0, avail), s.guest);
        if (avail < buf.length) buf.fill(0, avail);
        return;
      }
      case 'compressed': {
        const data = await this.#readCompressed(s.entry);
        buf.set(data.subarray(s.within, s.within + s.length));
      }
    }
  }

  async #readCompressed(e: L2Entry): Promise<Uint8Array> {
    const bytes = e.sectors * 512 - (e.host % 512);
    const raw = new Uint8Array(bytes);
    const n = await this.file.read(raw, e.host);
    return decompressCluster(this.header.compressionType, raw.subarray(0, n), this.clusterSize);
  }

  /**
   * Reads guest bytes [offset, offset + buf.length) into `buf`.
   * Precondition: the range is within the disk (the generic layer checks bounds).
   */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    const g = this.#enter();
    try {
      const segs = await this.#mapRange(offset, buf.length);
      await Promise.all(
        segs.map((s) =>
          this.#readSegment(buf.subarray(s.guest - offset, s.guest - offset + s.length), s),
        ),
      );
    } finally {
      this.#leave(g);
    }
  }

  /** Block status of [offset, offset + length), coalesced. Precondition: within the disk. */
  async blockStatus(offset: number, length: number): Promise<Qcow2Extent[]> {
    const g = this.#enter();
    try {
      const segs = await this.#mapRange(offset, length);
      const out: Qcow2Extent[] = [];
      for (const s of segs) {
        const x: Qcow2Extent =
          s.kind === 'data'
            ? { offset: s.guest, length: s.length, status: 'data', hostOffset: s.host }
            : s.kind === 'compressed'
              ? { offset: s.guest, length: s.length, status: 'data', compressed: true }
              : s.kind === 'zero'
                ? { offset: s.guest, length: s.length, status: 'zero' }
                : { offset: s.guest, length: s.length, status: 'unallocated' };
        const last = out[out.length - 1];
        if (
          last &&
          last.status === x.status &&
          !last.compressed &&
          !x.compressed &&
          last.offset + last.length === x.offset &&
          (x.status !== 'data' || last.hostOffset! + last.length === x.hostOffset)
        ) {
          last.length += x.length;
        } else out.push(x);
      }
      return out;
    } finally {
      this.#leave(g);
    }
  }

  // ---- writes ----------------------------------------------------------------------------

  /** Fills `target` with the current content of guest bytes [guest, guest+len) of cluster `ci`. */
  async #readCurrent(target: Uint8Array, e: L2Entry, ci: number, from: number): Promise<void> {
    const segs: Segment[] = [];
    this.#segmentsOf(e, ci, from, from + target.length, segs);
    const base = ci * this.clusterSize + from;
    await Promise.all(
      segs.map((s) =>
        this.#readSegment(target.subarray(s.guest - base, s.guest - base + s.length), s),
      ),
    );
  }

  /** Whether writing [from, to) of a cluster with entry `e` needs no metadata change. */
  #inPlace(e: L2Entry, from: number, to: number): boolean {
    if (e.compressed || e.host === 0 || !e.copied) return false;
    const need = this.#touchedMask(from, to);
    return ((e.alloc >>> 0) & need) === need;
  }

  #touchedMask(from: number, to: number): number {
    const s = this.geom.subclusterSize;
    const a = Math.floor(from / s);
    const b = Math.ceil(to / s);
    let m = 0;
    for (let i = a; i < b; i++) m = (m | (2 ** i)) >>> 0;
    return m >>> 0;
  }

  /**
   * Writes `buf` at guest `offset` as the graph does: map, write the data (with the rest of
   * a new allocation unit filled by copy on write), then commit, or abort on failure.
   * Precondition: the range is within the disk.
   */
  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.#checkWritable();
    const end = offset + buf.length;
    for (let pos = offset; pos < end; ) {
      const m = this.mapWriteCached(pos, end - pos) ?? (await this.mapWrite(pos, end - pos));
      await this.#writeMapped(m, buf.subarray(pos - offset, pos - offset + m.length), pos);
      pos += m.length;
    }
  }

  /** The data write of one mapping, then its commit (abort if the data write failed). */
  async #writeMapped(m: Qcow2WriteMapping, data: Uint8Array, offset: number): Promise<void> {
    const a = m.allocation;
    try {
      let unit = data;
      if (a.start < offset || a.end > offset + data.length) {
        unit = new Uint8Array(a.end - a.start);
        const head = unit.subarray(0, offset - a.start);
        const tail = unit.subarray(offset - a.start + data.length);
        if (a.from === 'below') {
          await this.#readBelow(head, a.start);
          await this.#readBelow(tail, offset + data.length);
        }
        unit.set(data, offset - a.start);
      }
      await this.file.write(unit, m.host - (offset - a.start));
    } catch (err) {
      await a.abort(err);
      throw err;
    }
    await a.commit();
  }

  /** Reads the backing disk into `buf` (zeros past its end or without one). */
  async #readBelow(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return;
    await this.#readSegment(buf, { kind: 'backing', guest: offset, length: buf.length });
  }

  // ---- compressed writes -------------------------------------------------------------------

  /**
   * Writes one guest cluster compressed (as `qemu-img convert -c` does): `data` is the
   * whole cluster (the last one of the disk may be shorter: it is padded with zeros). Data
   * that does not compress below a cluster is written as a normal cluster. Compressed data
   * is packed byte by byte into host clusters shared with other compressed clusters.
   * Precondition: `offset` cluster aligned, within the disk.
   */
  async writeCompressed(data: Uint8Array, offset: number): Promise<void> {
    this.#checkWritable();
    const cs = this.clusterSize;
    let full = data;
    if (data.length < cs) {
      full = new Uint8Array(cs);
      full.set(data);
    }
    const packed = compressCluster(this.header.compressionType, full);
    if (packed.length >= cs - 512) {
      await this.write(data, offset);
      return;
    }
    const g = this.#enter();
    const ci = Math.floor(offset / cs);
    const l1i = Math.floor(offset / this.geom.l2Span);
    await this.#clusterLocks.lockAll([ci]);
    try {
      await this.#beforeMetadataChange();
      const l2 = await this.#getOrCreateL2(l1i);
      try {
        const e = this.#entryAt(l2, ci);
        const host = await this.#allocBytes(packed.length);
        await this.file.write(packed, host);
        const sectors = Math.ceil(((host % 512) + packed.length) / 512);
        const [hi, lo] = encodeCompressed(host, sectors, this.geom.clusterBits);
        encodeL2Compressed(l2.data, ci % this.geom.l2Entries, hi, lo, this.geom);
        this.#l2Cache.markDirty(l2);
        if (e.compressed) this.#free(e.host - (e.host % 512), e.sectors * 512);
        else if (e.host !== 0) this.#free(e.host, cs);
      } finally {
        this.#l2Cache.unpin(l2);
      }
    } finally {
      this.#clusterLocks.unlockAll([ci]);
      this.#leave(g);
    }
  }

  /** Host bytes for compressed data, each host cluster they touch counted once more. */
  async #allocBytes(size: number): Promise<number> {
    const cs = this.clusterSize;
    return this.#bytesMutex.run(async () => {
      const t = this.#byteTail;
      if (t && t.end - t.offset >= size) {
        const clusterStart = t.offset - (t.offset % cs);
        try {
          await this.refcounts.update(clusterStart, 1, 1);
          const at = t.offset;
          t.offset += size;
          return at;
        } catch (err) {
          if (!(err instanceof Qcow2Error) || err.code !== Qcow2ErrorCode.REFCOUNT_OVERFLOW)
            throw err;
          // refcount_bits too small to share the cluster: start a new one.
        }
      }
      const n = Math.ceil(size / cs);
      const base = await this.#allocData(n);
      const end = base + n * cs;
      this.#byteTail = base + size < end ? { offset: base + size, end } : null;
      return base;
    });
  }

  // ---- map-style access (for the graph adapter) ----------------------------------------------

  /**
   * mapRead answered synchronously from the cache: null when the L2 table is not cached
   * (then use mapRead). Precondition as mapRead.
   */
  mapReadCached(offset: number, length: number): Qcow2ReadMapping | null {
    if (this.#closed) return null;
    const g = this.geom;
    const l1i = Math.floor(offset / g.l2Span);
    const l2off = this.#l1[l1i] ?? 0;
    const l2 = l2off === 0 ? null : this.#l2Cache.peek(l2off);
    if (l2off !== 0 && !l2) return null;
    const end = Math.min(offset + length, (l1i + 1) * g.l2Span);
    const out: Segment[] = [];
    try {
      for (let pos = offset; pos < end && out.length < 2; ) {
        const ci = Math.floor(pos / g.clusterSize);
        const cEnd = Math.min(end, (ci + 1) * g.clusterSize);
        this.#segmentsOf(
          this.#entryAt(l2 ?? null, ci),
          ci,
          pos - ci * g.clusterSize,
          cEnd - ci * g.clusterSize,
          out,
        );
        pos = cEnd;
      }
    } catch {
      return null; // a corrupt entry: the asynchronous path reports it
    }
    return readMappingOf(out[0]!);
  }

  /**
   * mapWrite answered synchronously when the range starts in clusters that are written in
   * place (L2 table cached, allocated, refcount one); null otherwise (then use mapWrite).
   * Precondition as mapWrite.
   */
  mapWriteCached(offset: number, length: number): Qcow2WriteMapping | null {
    if (this.#closed || this.readOnly || this.#corrupt) return null;
    const g = this.geom;
    const cs = g.clusterSize;
    const l1i = Math.floor(offset / g.l2Span);
    const l2off = this.#l1[l1i] ?? 0;
    const l2 = l2off === 0 ? null : this.#l2Cache.peek(l2off);
    if (!l2) return null;
    const end = Math.min(offset + length, (l1i + 1) * g.l2Span);
    let host = -1;
    let pos = offset;
    try {
      while (pos < end) {
        const ci = Math.floor(pos / cs);
        const e = this.#entryAt(l2, ci);
        const from = pos - ci * cs;
        const to = Math.min(end, (ci + 1) * cs) - ci * cs;
        if (!this.#inPlace(e, from, to)) break;
        if (host >= 0 && e.host + from !== host + (pos - offset)) break;
        if (this.#isMetadata(e.host)) return null; // the asynchronous path reports it
        if (host < 0) host = e.host + from;
        pos = ci * cs + to;
      }
    } catch {
      return null;
    }
    if (pos === offset) return null;
    const gen = this.#enter();
    const done = async () => this.#leave(gen);
    return {
      length: pos - offset,
      host,
      allocation: { start: offset, end: pos, from: 'zero', commit: done, abort: done },
    };
  }

  /**
   * Where guest [offset, offset + length) lives, from offset on (one answer, stopping where
   * the kind or host contiguity changes or at an L2 table boundary). Precondition: within
   * the disk, length > 0.
   */
  async mapRead(offset: number, length: number): Promise<Qcow2ReadMapping> {
    const g = this.#enter();
    try {
      const l2End = (Math.floor(offset / this.geom.l2Span) + 1) * this.geom.l2Span;
      const segs = await this.#mapRange(offset, Math.min(length, l2End - offset), true);
      return readMappingOf(segs[0]!);
    } finally {
      this.#leave(g);
    }
  }

  /**
   * Maps a guest write (see Qcow2WriteMapping), allocating where needed; compressed or
   * shared clusters are first copied into a cluster of their own. The answer covers at
   * least one byte; the caller asks again for the rest. Precondition: within the disk,
   * length > 0, image writable.
   */
  async mapWrite(offset: number, length: number): Promise<Qcow2WriteMapping> {
    this.#checkWritable();
    const gen = this.#enter();
    let handedOff = false;
    try {
      const m = await this.#mapWrite(offset, length, gen);
      handedOff = true;
      return m;
    } finally {
      if (!handedOff) this.#leave(gen);
    }
  }

  async #mapWrite(offset: number, length: number, gen: number): Promise<Qcow2WriteMapping> {
    const gm = this.geom;
    const cs = gm.clusterSize;
    const l1i = Math.floor(offset / gm.l2Span);
    const end = Math.min(offset + length, (l1i + 1) * gm.l2Span);
    const c0 = Math.floor(offset / cs);
    const inPlace = (host: number, len: number): Qcow2WriteMapping => ({
      length: len,
      host,
      allocation: {
        start: offset,
        end: offset + len,
        from: 'zero',
        commit: async () => this.#leave(gen),
        abort: async () => this.#leave(gen),
      },
    });
    // In place without locks: a run of allocated clusters, contiguous in the file.
    const fast = await this.#inPlaceRun(l1i, offset, end);
    if (fast) {
      await this.#checkDataHost(fast.host, fast.length);
      return inPlace(fast.host, fast.length);
    }
    // Lock the clusters this mapping may cover (at most 32), then look again.
    const cLast = Math.min(Math.floor((end - 1) / cs), c0 + 31);
    const keys: number[] = [];
    for (let ci = c0; ci <= cLast; ci++) keys.push(ci);
    await this.#clusterLocks.lockAll(keys);
    let locked = keys;
    const unlock = (ks: number[]) => this.#clusterLocks.unlockAll(ks);
    let l2: CacheEntry | null = null;
    try {
      await this.#beforeMetadataChange();
      l2 = await this.#getOrCreateL2(l1i);
      let e = this.#entryAt(l2, c0);
      if (e.compressed || (e.host !== 0 && !e.copied)) {
        e = await this.#makePrivate(l2, c0, e);
      }
      const again = await this.#inPlaceRun(l1i, offset, end);
      if (again) {
        await this.#checkDataHost(again.host, again.length);
        this.#l2Cache.unpin(l2);
        l2 = null;
        unlock(locked);
        locked = [];
        return inPlace(again.host, again.length);
      }
      const cBase = c0 * cs;
      const from = offset - cBase;
      const sourceOf = (x: L2Entry, sub: number): 'below' | 'zero' =>
        (x.zero & (2 ** sub)) !== 0 || !this.#backing ? 'zero' : 'below';
      let start: number;
      let unitEnd: number;
      let src: 'below' | 'zero';
      let hostStart: number;
      let entries: Array<{ ci: number; e: L2Entry; host: number; fresh: boolean }>;
      if (gm.extendedL2) {
        // One cluster; the unit is the span of touched subclusters, minus allocated edges.
        const sc = gm.subclusterSize;
        const to = Math.min(end, cBase + cs) - cBase;
        const a = Math.floor(from / sc);
        let b = Math.ceil(to / sc);
        const headPartial = from % sc !== 0 && (e.alloc & (2 ** a)) === 0;
        let tailPartial = to % sc !== 0 && (e.alloc & (2 ** (b - 1))) === 0;
        let wEnd = to;
        if (headPartial && tailPartial && b - 1 !== a && sourceOf(e, a) !== sourceOf(e, b - 1)) {
          // Different sources at both ends: stop at the end of the head subcluster.
          wEnd = (a + 1) * sc;
          b = a + 1;
          tailPartial = false;
        }
        src = headPartial ? sourceOf(e, a) : tailPartial ? sourceOf(e, b - 1) : 'zero';
        start = cBase + (headPartial ? a * sc : from);
        unitEnd = cBase + (tailPartial ? b * sc : wEnd);
        const fresh = e.host === 0;
        const host = fresh ? 0 : e.host;
        entries = [{ ci: c0, e, host, fresh }];
        hostStart = host;
        locked = this.#keepLocked(locked, c0);
        if (fresh) {
          hostStart = await this.#allocData(1);
          entries[0]!.host = hostStart;
        }
        const touched = this.#touchedMask(start - cBase, unitEnd - cBase);
        const mapping: Qcow2WriteMapping = {
          length: Math.min(end, unitEnd) - offset,
          host: hostStart + (offset - cBase),
          allocation: this.#allocationFor(l2, entries, start, unitEnd, src, gen, locked, (x) => ({
            ...x,
            copied: true,
            alloc: (x.alloc | touched) >>> 0,
            zero: (x.zero & ~touched) >>> 0,
          })),
        };
        l2 = null;
        locked = [];
        return mapping;
      }
      // Standard L2: whole clusters. A zero cluster keeping its host is rewritten in place.
      if (e.host !== 0) {
        locked = this.#keepLocked(locked, c0);
        entries = [{ ci: c0, e, host: e.host, fresh: false }];
        const mapping: Qcow2WriteMapping = {
          length: Math.min(end, cBase + cs) - offset,
          host: e.host + from,
          allocation: this.#allocationFor(
            l2,
            entries,
            cBase,
            cBase + cs,
            'zero',
            gen,
            locked,
            (x) => ({
              ...x,
              copied: true,
              alloc: 1,
              zero: 0,
            }),
          ),
        };
        await this.#checkDataHost(e.host, cs);
        l2 = null;
        locked = [];
        return mapping;
      }
      // Fresh clusters: the first, then following ones the write covers whole (or the last
      // partly, when it fills from the same source).
      const headSrc = sourceOf(e, 0);
      const headFill = from !== 0;
      entries = [{ ci: c0, e, host: 0, fresh: true }];
      src = headSrc;
      if (end >= cBase + cs) {
        for (let ci = c0 + 1; ci <= cLast; ci++) {
          const x = this.#entryAt(l2, ci);
          if (x.compressed || x.host !== 0) break;
          if (end >= (ci + 1) * cs) {
            entries.push({ ci, e: x, host: 0, fresh: true });
            continue;
          }
          const tailSrc = sourceOf(x, 0);
          if (!headFill || tailSrc === headSrc) {
            entries.push({ ci, e: x, host: 0, fresh: true });
            src = tailSrc;
          }
          break;
        }
      }
      locked = this.#keepLocked(locked, entries[entries.length - 1]!.ci);
      hostStart = await this.#allocData(entries.length);
      entries.forEach((x, k) => {
        x.host = hostStart + k * cs;
      });
      const unitStart = cBase;
      const unitEndStd = (entries[entries.length - 1]!.ci + 1) * cs;
      const mapping: Qcow2WriteMapping = {
        length: Math.min(end, unitEndStd) - offset,
        host: hostStart + from,
        allocation: this.#allocationFor(
          l2,
          entries,
          unitStart,
          unitEndStd,
          src,
          gen,
          locked,
          (x) => ({
            ...x,
            copied: true,
            alloc: 1,
            zero: 0,
          }),
        ),
      };
      l2 = null;
      locked = [];
      return mapping;
    } finally {
      if (l2) this.#l2Cache.unpin(l2);
      if (locked.length) unlock(locked);
    }
  }

  /** Unlocks the keys after `last` and returns the ones kept. */
  #keepLocked(keys: number[], last: number): number[] {
    const keep = keys.filter((k) => k <= last);
    this.#clusterLocks.unlockAll(keys.filter((k) => k > last));
    return keep;
  }

  /** Allocates `n` contiguous data clusters, refusing any that overlaps metadata. */
  async #allocData(n: number): Promise<number> {
    const cs = this.clusterSize;
    const base = await this.refcounts.allocate(n);
    for (let c = 0; c < n; c++) {
      if (this.#isMetadata(base + c * cs)) {
        await this.#markCorrupt(
          `allocated cluster ${base + c * cs} overlaps metadata (refcounts are wrong)`,
        );
      }
    }
    return base;
  }

  /** A run of in-place writable clusters from `offset`, contiguous in the file; null if none. */
  async #inPlaceRun(
    l1i: number,
    offset: number,
    end: number,
  ): Promise<{ host: number; length: number } | null> {
    const l2 = await this.#getL2(l1i);
    if (!l2) return null;
    const cs = this.clusterSize;
    try {
      let host = -1;
      let pos = offset;
      while (pos < end) {
        const ci = Math.floor(pos / cs);
        const e = this.#entryAt(l2, ci);
        const from = pos - ci * cs;
        const to = Math.min(end, (ci + 1) * cs) - ci * cs;
        if (!this.#inPlace(e, from, to)) break;
        if (host >= 0 && e.host + from !== host + (pos - offset)) break;
        if (host < 0) host = e.host + from;
        pos = ci * cs + to;
      }
      return pos > offset ? { host, length: pos - offset } : null;
    } finally {
      this.#l2Cache.unpin(l2);
    }
  }

  /** Copies a compressed or shared cluster into a cluster of its own and links it. */
  async #makePrivate(l2: CacheEntry, ci: number, e: L2Entry): Promise<L2Entry> {
    const cs = this.clusterSize;
    if (!e.compressed) {
      const rc = await this.refcounts.get(e.host / cs);
      if (rc === 0) await this.#markCorrupt(`data cluster ${e.host} in use but has refcount 0`);
      if (rc === 1) {
        const ne = { ...e, copied: true };
        encodeL2(l2.data, ci % this.geom.l2Entries, ne, this.geom);
        this.#l2Cache.markDirty(l2);
        return ne;
      }
    }
    const buf = new Uint8Array(cs);
    await this.#readCurrent(buf, e, ci, 0);
    const host = await this.#allocData(1);
    await this.file.write(buf, host);
    const ne: L2Entry = {
      compressed: false,
      host,
      copied: true,
      alloc: this.geom.fullMask,
      zero: 0,
      sectors: 0,
    };
    encodeL2(l2.data, ci % this.geom.l2Entries, ne, this.geom);
    this.#l2Cache.markDirty(l2);
    if (e.compressed) this.#free(e.host - (e.host % 512), e.sectors * 512);
    else this.#free(e.host, cs);
    return ne;
  }

  /** The commit/abort pair of an allocation; takes over the L2 pin and the locks. */
  #allocationFor(
    l2: CacheEntry,
    entries: Array<{ ci: number; e: L2Entry; host: number; fresh: boolean }>,
    start: number,
    end: number,
    from: 'below' | 'zero',
    gen: number,
    locked: number[],
    update: (e: L2Entry) => L2Entry,
  ): Qcow2WriteMapping['allocation'] {
    let settled = false;
    const finish = () => {
      settled = true;
      this.#l2Cache.unpin(l2);
      this.#clusterLocks.unlockAll(locked);
      this.#leave(gen);
    };
    return {
      start,
      end,
      from,
      commit: async () => {
        if (settled) return;
        try {
          for (const x of entries) {
            encodeL2(
              l2.data,
              x.ci % this.geom.l2Entries,
              update({ ...x.e, host: x.host }),
              this.geom,
            );
          }
          this.#l2Cache.markDirty(l2);
        } finally {
          finish();
        }
      },
      abort: async () => {
        if (settled) return;
        try {
          const fresh = entries.filter((x) => x.fresh);
          // Never linked anywhere: the clusters can be returned at once.
          for (const x of fresh) await this.refcounts.update(x.host, this.clusterSize, -1);
        } finally {
          finish();
        }
      },
    };
  }

  // ---- write zeroes and discard ------------------------------------------------------------

  /**
   * Makes [offset, offset + length) read as zeros: zero clusters (v3) or deallocation (v2
   * without backing) for whole clusters, zero subclusters with extended L2, data for the rest.
   * With `mayUnmap` the host clusters of whole zeroed clusters are freed, otherwise kept
   * (preallocated). Precondition: within the disk.
   */
  async writeZeroes(
    offset: number,
    length: number,
    opts: { mayUnmap?: boolean } = {},
  ): Promise<void> {
    this.#checkWritable();
    if (this.header.version < 3 && this.#backing) {
      // v2 cannot mark zeros over a backing file: write them.
      const chunk = new Uint8Array(Math.min(length, 4 * MiB));
      for (let p = offset; p < offset + length; p += chunk.length) {
        await this.write(chunk.subarray(0, Math.min(chunk.length, offset + length - p)), p);
      }
      return;
    }
    await this.#zeroOrDiscard(offset, length, opts.mayUnmap ?? false, false);
  }

  /**
   * Discards [offset, offset + length): whole clusters in it are freed (their refcount
   * drops once the change is on disk; the file gets the discard too) and read as zeros
   * afterwards, except on v2 images over a backing file, where they read from it again.
   * With extended L2, whole subclusters of the other clusters read as zeros (their host
   * cluster stays). The rest is left unchanged (discard is advisory). Precondition: within
   * the disk.
   */
  async discard(offset: number, length: number): Promise<void> {
    this.#checkWritable();
    await this.#zeroOrDiscard(offset, length, true, true);
  }

  async #zeroOrDiscard(
    offset: number,
    length: number,
    unmap: boolean,
    discard: boolean,
  ): Promise<void> {
    const g = this.#enter();
    const partial: Array<[number, number]> = [];
    try {
      const gm = this.geom;
      let pos = offset;
      const end = offset + length;
      while (pos < end) {
        const l1i = Math.floor(pos / gm.l2Span);
        const chunkEnd = Math.min(end, (l1i + 1) * gm.l2Span);
        await this.#zeroChunk(pos, chunkEnd, l1i, unmap, discard, partial);
        pos = chunkEnd;
      }
    } finally {
      this.#leave(g);
    }
    for (const [from, to] of partial) await this.write(new Uint8Array(to - from), from);
    const batch = this.#options.discardBatch ?? 1024;
    if (this.#pendingFrees.length >= batch) await this.#flushMetadata();
  }

  async #zeroChunk(
    start: number,
    end: number,
    l1i: number,
    unmap: boolean,
    discard: boolean,
    partial: Array<[number, number]>,
  ): Promise<void> {
    const g = this.geom;
    const cs = g.clusterSize;
    const sc = g.subclusterSize;
    const v3 = this.header.version >= 3;
    const hasBacking = this.#backing !== null;
    const c0 = Math.floor(start / cs);
    const c1 = Math.floor((end - 1) / cs);
    const keys: number[] = [];
    for (let ci = c0; ci <= c1; ci++) keys.push(ci);
    await this.#clusterLocks.lockAll(keys);
    try {
      const existing = await this.#getL2(l1i);
      if (!existing && !hasBacking) return; // no L2 table, no backing: reads as zeros already
      if (existing) this.#l2Cache.unpin(existing);
      await this.#beforeMetadataChange();
      const l2 = await this.#getOrCreateL2(l1i);
      try {
        let changed = false;
        for (let ci = c0; ci <= c1; ci++) {
          const e = this.#entryAt(l2, ci);
          const from = Math.max(start, ci * cs) - ci * cs;
          const to = Math.min(end, (ci + 1) * cs) - ci * cs;
          // Subclusters fully inside [from, to).
          const a = Math.ceil(from / sc);
          const b = Math.floor(to / sc);
          if (b <= a) {
            if (!discard && !this.#readsZero(e, from, to))
              partial.push([ci * cs + from, ci * cs + to]);
            continue;
          }
          if (!discard) {
            if (from < a * sc && !this.#readsZero(e, from, a * sc))
              partial.push([ci * cs + from, ci * cs + a * sc]);
            if (b * sc < to && !this.#readsZero(e, b * sc, to))
              partial.push([ci * cs + b * sc, ci * cs + to]);
          }
          const whole = a === 0 && b === g.subclusters;
          if (!g.extendedL2 && !whole) continue;
          let mask = 0;
          for (let i = a; i < b; i++) mask = (mask | (2 ** i)) >>> 0;
          const makeZero = discard ? hasBacking && v3 : v3;
          let ne: L2Entry;
          if (!whole) {
            // Extended L2, whole subclusters of a cluster.
            if (e.compressed || (e.host !== 0 && !e.copied)) {
              if (!discard) partial.push([ci * cs + a * sc, ci * cs + b * sc]);
              continue;
            }
            ne = {
              ...e,
              alloc: (e.alloc & ~mask) >>> 0,
              zero: makeZero ? (e.zero | mask) >>> 0 : (e.zero & ~mask) >>> 0,
            };
          } else if (!discard && !unmap && v3 && !e.compressed && e.host !== 0 && e.copied) {
            // Zero cluster keeping its host cluster (preallocated).
            ne = { ...e, alloc: 0, zero: g.fullMask };
          } else {
            if (e.compressed) this.#free(e.host - (e.host % 512), e.sectors * 512);
            else if (e.host !== 0) this.#free(e.host, cs, true);
            ne = { ...UNALLOCATED, zero: makeZero ? g.fullMask : 0 };
          }
          encodeL2(l2.data, ci % g.l2Entries, ne, g);
          changed = true;
        }
        if (changed) this.#l2Cache.markDirty(l2);
      } finally {
        this.#l2Cache.unpin(l2);
      }
    } finally {
      this.#clusterLocks.unlockAll(keys);
    }
  }

  /** Whether [from, to) of a cluster with entry `e` reads as zeros without touching data. */
  #readsZero(e: L2Entry, from: number, to: number): boolean {
    if (e.compressed) return false;
    const m = this.#touchedMask(from, to);
    if ((e.alloc & m) !== 0) return false;
    return this.#backing === null || (e.zero & m) >>> 0 === m;
  }

  // ---- flush and close -----------------------------------------------------------------------

  /** Writes back metadata in crash-safe order and flushes the file. */
  async flush(): Promise<void> {
    if (this.#closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
    if (this.readOnly) return;
    await this.#flushMetadata();
  }

  #flushMetadata(): Promise<void> {
    return this.#flushMutex.run(async () => {
      // Snapshot first (synchronously): every L2 entry in it was set after its refcount
      // increment, which the refcount write below therefore includes. The snapshotted
      // tables stay cached until their snapshot has landed (beginWrite/endWrite).
      const l2Snap = this.#l2Cache
        .dirtyEntries()
        .map((e) => ({ e, copy: this.#l2Cache.beginWrite(e) }));
      let l2Done = false;
      const l1Snap = [...this.#l1Dirty];
      this.#l1Dirty.clear();
      const l1Copy = this.#l1.slice();
      const l1CopiedCopy = this.#l1Copied.slice();
      const freeCut = this.#pendingFrees.length;
      try {
        // With lazy refcounts the dirty bit covers stale refcounts: they are written on close.
        if (!this.lazyRefcounts) await this.refcounts.writeDirty();
        if (l2Snap.length > 0 || l1Snap.length > 0) {
          await this.file.flush();
          await Promise.all(l2Snap.map((s) => this.file.write(s.copy, s.e.offset)));
          l2Done = true;
          for (const s of l2Snap) this.#l2Cache.endWrite(s.e, true);
          if (l1Snap.length > 0) {
            await this.file.flush();
            const sectors = new Set(l1Snap.map((i) => Math.floor(i / 64)));
            await Promise.all(
              [...sectors].map((sec) => {
                const first = sec * 64;
                const n = Math.min(64, l1Copy.length - first);
                const buf = new Uint8Array(n * 8);
                const dv = new DataView(buf.buffer);
                for (let j = 0; j < n; j++)
                  encodeL1(dv, j * 8, l1Copy[first + j]!, l1CopiedCopy[first + j]!);
                return this.file.write(buf, this.header.l1TableOffset + first * 8);
              }),
            );
          }
        } else l2Done = true;
        await this.file.flush();
      } catch (err) {
        if (!l2Done) for (const s of l2Snap) this.#l2Cache.endWrite(s.e, false);
        for (const i of l1Snap) this.#l1Dirty.add(i);
        throw err;
      }
      // The L2 changes recorded before the snapshot are on disk: their frees may proceed once
      // no request that started before them is still running.
      const min = this.#minActive();
      const keep: PendingFree[] = [];
      const apply: PendingFree[] = [];
      this.#pendingFrees.forEach((f, i) => {
        if (i < freeCut && f.gen < min) apply.push(f);
        else keep.push(f);
      });
      this.#pendingFrees = keep;
      if (apply.length > 0) await this.#bytesMutex.lock();
      try {
        for (const f of apply) {
          // The cluster compressed data is being packed into may become free: stop packing.
          const t = this.#byteTail;
          const tailCluster = t ? t.offset - (t.offset % this.clusterSize) : 0;
          if (t && f.offset < t.end && f.offset + f.bytes > tailCluster) this.#byteTail = null;
        }
      } finally {
        if (apply.length > 0) this.#bytesMutex.unlock();
      }
      for (const f of apply) {
        // A data cluster nothing refers to any more goes back to the file too (QEMU's
        // pass-discard-request), before its refcount drops: until then nobody can reuse it.
        if (
          f.passDown &&
          this.file.discard &&
          (await this.refcounts.get(f.offset / this.clusterSize)) === 1
        ) {
          await this.file.discard(f.offset, f.bytes).catch(() => {});
        }
        await this.refcounts.update(f.offset, f.bytes, -1);
      }
    });
  }

  /** Number of clusters freed but not yet returned to the refcounts. */
  get pendingFrees(): number {
    return this.#pendingFrees.length;
  }

  /**
   * Writes everything back, clears the dirty bit, flushes and closes. Precondition: no
   * request in flight. The file is not closed (its owner does that).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (!this.readOnly && !this.#corrupt) {
      // Twice: the first returns freed clusters to the refcounts, the second writes them.
      await this.#flushMetadata();
      await this.#flushMetadata();
      await this.refcounts.writeDirty();
      await this.file.flush();
      if (this.header.incompatibleFeatures & Incompat.DIRTY) {
        this.header.incompatibleFeatures &= ~Incompat.DIRTY;
        await this.#writeHeader();
      }
    }
    this.#closed = true;
    this.#l2Cache.clear();
  }

  /**
   * Checks the image (refcounts against references, as checkQcow2). An image open for
   * writing is written back first, freed clusters returned, so that only real problems
   * show. Precondition: no request in flight.
   */
  async check(): Promise<Qcow2CheckResult> {
    if (this.#closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, 'qcow2 image is closed');
    if (!this.readOnly && !this.#corrupt) {
      await this.#flushMetadata();
      await this.#flushMetadata();
      await this.refcounts.writeDirty();
      await this.file.flush();
    }
    return checkQcow2(this.file);
  }

  /** The L1 table as it is in memory (offsets without flags). For check and tests. */
  get l1Table(): readonly number[] {
    return this.#l1;
  }
}
