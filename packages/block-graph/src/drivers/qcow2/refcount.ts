// Refcounts (docs/interop/qcow2.txt, "Host cluster management"): the refcount table, a
// bounded cache of refcount blocks, cluster allocation and freeing, and growth of the table.
//
// Ordering rules this module keeps (the owner keeps the rest, see image.ts and flush.ts):
// - a new refcount block is written (and flushed) before the table entry that points to it;
// - a grown refcount table is written and flushed before the header points to it, and the
//   old table is freed only after the header is flushed;
// - increments may reach the disk at any time (a crash leaks at worst); decrements are only
//   made by the owner once nothing on disk refers to the cluster any more.

import { Qcow2CorruptError, Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { MAX_REFTABLE_BYTES } from './header.ts';
import { type CacheEntry, MetadataCache } from './l2-cache.ts';
import { Mutex } from './lock.ts';
import { ioBuffer, type Qcow2File, releaseIoBuffer } from './types.ts';

/** Where refcount `i` of a block of `1 << order`-bit entries (order 0 to 2) lies in its byte. */
function subByte(i: number, order: number): { byte: number; shift: number; mask: number } {
  const bits = 1 << order;
  const bit = i * bits;
  return { byte: bit >> 3, shift: bit & 7, mask: (1 << bits) - 1 };
}

/** Reads refcount `i` of a block of `1 << order`-bit entries. Throws if too large for JS. */
export function getRefcount(buf: Uint8Array, i: number, order: number): number {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const { byte, shift, mask } = subByte(i, order);
      return (buf[byte]! >> shift) & mask;
    }
    case 3:
      return buf[i]!;
    case 4:
      return (buf[2 * i]! << 8) | buf[2 * i + 1]!;
    case 5:
      return new DataView(buf.buffer, buf.byteOffset + 4 * i, 4).getUint32(0);
    default: {
      const v = new DataView(buf.buffer, buf.byteOffset + 8 * i, 8).getBigUint64(0);
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new Qcow2CorruptError(`refcount ${v} is implausibly large`);
      }
      return Number(v);
    }
  }
}

export function setRefcount(buf: Uint8Array, i: number, order: number, v: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const { byte, shift, mask } = subByte(i, order);
      buf[byte] = (buf[byte]! & ~(mask << shift)) | ((v & mask) << shift);
      return;
    }
    case 3:
      buf[i] = v;
      return;
    case 4:
      buf[2 * i] = v >> 8;
      buf[2 * i + 1] = v & 0xff;
      return;
    case 5:
      new DataView(buf.buffer, buf.byteOffset + 4 * i, 4).setUint32(0, v);
      return;
    default:
      new DataView(buf.buffer, buf.byteOffset + 8 * i, 8).setBigUint64(0, BigInt(v));
  }
}

/** The largest refcount an entry of `1 << order` bits holds (capped to a safe integer). */
export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

export class RefcountOverflowError extends Qcow2Error {
  override name = 'RefcountOverflowError';
  constructor(cluster: number, max: number) {
    super(
      Qcow2ErrorCode.REFCOUNT_OVERFLOW,
      `refcount of host cluster ${cluster} would exceed ${max} (refcount_bits too small)`,
    );
  }
}

export interface RefcountGeometry {
  clusterBits: number;
  refcountOrder: number;
}

export interface RefcountOptions {
  /** Refcount blocks kept in memory. */
  cacheCapacity: number;
  /** Points the header at a new refcount table (write + flush). */
  writeHeaderReftable(offset: number, clusters: number): Promise<void>;
}

/** Reads a table of u64 entries (L1 or refcount table); a short read is corruption. */
export async function readTable(
  file: Qcow2File,
  offset: number,
  entries: number,
  what: string,
): Promise<number[]> {
  if (entries === 0) return [];
  const buf = ioBuffer(file, entries * 8);
  try {
    const n = await file.read(buf, offset);
    if (n < buf.length) {
      throw new Qcow2CorruptError(`${what} at ${offset} (${buf.length} bytes) is truncated`);
    }
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const out = new Array<number>(entries);
    for (let i = 0; i < entries; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      if (hi > 0x1fffff) throw new Qcow2CorruptError(`${what} entry ${i} offset is out of range`);
      out[i] = hi * 2 ** 32 + lo;
    }
    return out;
  } finally {
    releaseIoBuffer(file, buf);
  }
}

export class RefcountManager {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly order: number;
  /** Refcount entries per block. */
  readonly perBlock: number;
  readonly max: number;
  #file: Qcow2File;
  #opts: RefcountOptions;
  /** Block offsets by table index (0 = none). */
  table: number[];
  tableOffset: number;
  tableClusters: number;
  readonly #blocks: Set<number>;
  readonly #cache: MetadataCache;
  readonly #mutex = new Mutex();
  /** Block writes in flight, by offset (see #writeEntry). */
  readonly #writing = new Map<number, Promise<void>>();
  /** No free cluster below this index (a hint; QEMU's free_cluster_index). */
  #freeHint = 0;

  constructor(
    file: Qcow2File,
    geom: RefcountGeometry,
    table: number[],
    tableOffset: number,
    tableClusters: number,
    opts: RefcountOptions,
  ) {
    this.#file = file;
    this.#opts = opts;
    this.clusterBits = geom.clusterBits;
    this.clusterSize = 2 ** geom.clusterBits;
    this.order = geom.refcountOrder;
    this.perBlock = (this.clusterSize * 8) >> geom.refcountOrder;
    this.max = maxRefcount(geom.refcountOrder);
    this.table = table;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.#blocks = new Set();
    // An indexed loop: entries() destructuring runs cold here (once per open) and cost
    // ~20 ms over one cluster's 8192 entries, a good part of a short convert.
    for (let i = 0; i < table.length; i++) {
      const e = table[i]!;
      if (e === 0) continue;
      if (e % this.clusterSize !== 0) {
        throw new Qcow2CorruptError(`refcount table entry ${i} (${e}) is not cluster aligned`);
      }
      this.#blocks.add(e);
    }
    this.#cache = new MetadataCache({
      capacity: opts.cacheCapacity,
      entrySize: this.clusterSize,
      load: async (offset, buf) => {
        const n = await this.#file.read(buf, offset);
        if (n < buf.length) {
          throw new Qcow2CorruptError(`refcount block at ${offset} is past the end of the file`);
        }
      },
      evictDirty: (e) => this.#writeEntry(e),
      alloc: (n) => ioBuffer(file, n),
      release: (b) => releaseIoBuffer(file, b),
    });
  }

  /** Gives back the cached blocks' memory. Precondition: nothing in flight. */
  close(): void {
    this.#cache.clear();
  }

  static async load(
    file: Qcow2File,
    geom: RefcountGeometry,
    tableOffset: number,
    tableClusters: number,
    opts: RefcountOptions,
  ): Promise<RefcountManager> {
    const entries = (tableClusters * 2 ** geom.clusterBits) / 8;
    const table = await readTable(file, tableOffset, entries, 'refcount table');
    return new RefcountManager(file, geom, table, tableOffset, tableClusters, opts);
  }

  /** Whether `offset` is a refcount block or inside the refcount table. */
  isRefcountMetadata(offset: number): boolean {
    if (this.#blocks.has(offset)) return true;
    return (
      offset >= this.tableOffset &&
      offset < this.tableOffset + this.tableClusters * this.clusterSize
    );
  }

  /** The refcount of host cluster `ci` (0 where no block covers it). */
  async get(ci: number): Promise<number> {
    const t = Math.floor(ci / this.perBlock);
    const block = this.table[t] ?? 0;
    if (block === 0) return 0;
    const e = await this.#cache.get(block);
    try {
      return getRefcount(e.data, ci % this.perBlock, this.order);
    } finally {
      this.#cache.unpin(e);
    }
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the host offset. */
  allocate(n: number): Promise<number> {
    return this.#mutex.run(() => this.#allocate(n));
  }

  /**
   * The first cluster of a run of `n` free ones allocate() would take, found without
   * waiting: undefined when that needs I/O or another allocation is running (then use
   * allocate). Nothing changes until takeRun.
   */
  findFreeCached(n: number): number | undefined {
    if (this.#mutex.locked) return undefined;
    let start = this.#freeHint;
    let ci = start;
    while (ci < start + n) {
      const t = Math.floor(ci / this.perBlock);
      const block = this.table[t] ?? 0;
      // Uncovered (a block to create first) or not cached: the asynchronous path.
      const e = block === 0 ? undefined : this.#cache.peek(block);
      if (!e) return undefined;
      const end = Math.min((t + 1) * this.perBlock, start + n);
      start = this.#skipUsed(e.data, ci, end, start);
      ci = end;
    }
    return start;
  }

  /**
   * The start of a free run being searched after clusters [ci, end) of one refcount
   * block's `data`: just past the last one in use there, else `start` unchanged.
   */
  #skipUsed(data: Uint8Array, ci: number, end: number, start: number): number {
    for (; ci < end; ci++) {
      if (getRefcount(data, ci % this.perBlock, this.order) !== 0) start = ci + 1;
    }
    return start;
  }

  /**
   * Takes the run findFreeCached just found (synchronously after it: nothing ran in
   * between); returns its host offset.
   */
  takeRun(start: number, n: number): number {
    for (let ci = start; ci < start + n; ) {
      const t = Math.floor(ci / this.perBlock);
      const e = this.#cache.getCached(this.table[t]!)!;
      try {
        const end = Math.min(start + n, (t + 1) * this.perBlock);
        for (; ci < end; ci++) setRefcount(e.data, ci % this.perBlock, this.order, 1);
        this.#cache.markDirty(e);
      } finally {
        this.#cache.unpin(e);
      }
    }
    this.#freeHint = start + n;
    return start * this.clusterSize;
  }

  /**
   * Adds `delta` to the refcount of every cluster overlapping [offset, offset + bytes).
   * Throws REFCOUNT_OVERFLOW, or CORRUPT when a refcount would go below zero.
   */
  update(offset: number, bytes: number, delta: number): Promise<void> {
    return this.#mutex.run(async () => {
      const first = Math.floor(offset / this.clusterSize);
      const last = Math.floor((offset + bytes - 1) / this.clusterSize);
      for (let ci = first; ci <= last; ci++) {
        if (delta > 0) await this.#ensureCovered(ci);
        await this.#change(ci, delta);
      }
    });
  }

  async #change(ci: number, delta: number): Promise<void> {
    const t = Math.floor(ci / this.perBlock);
    const block = this.table[t] ?? 0;
    if (block === 0) {
      throw new Qcow2CorruptError(`refcount of cluster ${ci} would go below zero (no block)`);
    }
    const e = await this.#cache.get(block);
    try {
      const i = ci % this.perBlock;
      const v = getRefcount(e.data, i, this.order) + delta;
      if (v < 0) throw new Qcow2CorruptError(`refcount of cluster ${ci} would go below zero`);
      if (v > this.max) throw new RefcountOverflowError(ci, this.max);
      setRefcount(e.data, i, this.order, v);
      this.#cache.markDirty(e);
      if (v === 0 && ci < this.#freeHint) this.#freeHint = ci;
    } finally {
      this.#cache.unpin(e);
    }
  }

  /** #change for `n` clusters from `start`, one block lookup per block. */
  async #changeRun(start: number, n: number, delta: number): Promise<void> {
    let ci = start;
    while (ci < start + n) {
      const t = Math.floor(ci / this.perBlock);
      const block = this.table[t] ?? 0;
      if (block === 0) {
        await this.#change(ci, delta); // reports the missing block
        ci++;
        continue;
      }
      const e = await this.#cache.get(block);
      try {
        const end = Math.min(start + n, (t + 1) * this.perBlock);
        for (; ci < end; ci++) {
          const i = ci % this.perBlock;
          const v = getRefcount(e.data, i, this.order) + delta;
          if (v < 0) throw new Qcow2CorruptError(`refcount of cluster ${ci} would go below zero`);
          if (v > this.max) throw new RefcountOverflowError(ci, this.max);
          setRefcount(e.data, i, this.order, v);
          if (v === 0 && ci < this.#freeHint) this.#freeHint = ci;
        }
        this.#cache.markDirty(e);
      } finally {
        this.#cache.unpin(e);
      }
    }
  }

  async #allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.#findFree(n);
      let covered = true;
      for (let ci = start; ci < start + n; ci++) {
        if ((this.table[Math.floor(ci / this.perBlock)] ?? 0) === 0) {
          await this.#ensureCovered(ci);
          covered = false;
          break;
        }
      }
      if (!covered) continue; // new metadata took space: search again
      await this.#changeRun(start, n, 1);
      this.#freeHint = start + n;
      return start * this.clusterSize;
    }
  }

  /** First run of `n` free clusters at or after the hint (uncovered ranges are free). */
  async #findFree(n: number): Promise<number> {
    let start = this.#freeHint;
    let ci = start;
    while (ci < start + n) {
      const t = Math.floor(ci / this.perBlock);
      const block = this.table[t] ?? 0;
      if (block === 0) {
        // The whole range of this table index is free.
        ci = (t + 1) * this.perBlock;
        continue;
      }
      const e = await this.#cache.get(block);
      try {
        const end = Math.min((t + 1) * this.perBlock, start + n);
        start = this.#skipUsed(e.data, ci, end, start);
        ci = end;
      } finally {
        this.#cache.unpin(e);
      }
    }
    return start;
  }

  /** Makes sure a refcount block covers host cluster `ci` (creating block or table). */
  async #ensureCovered(ci: number): Promise<void> {
    const t = Math.floor(ci / this.perBlock);
    if ((this.table[t] ?? 0) !== 0) return;
    if (t >= this.table.length) {
      await this.#growTable(t);
      return;
    }
    // Every refcount in range t is 0: put the block at its first cluster, counting itself.
    if (t === 0) throw new Qcow2CorruptError('no refcount block covers the header cluster');
    const blockIndex = t * this.perBlock;
    const offset = blockIndex * this.clusterSize;
    if (this.isRefcountMetadata(offset)) {
      throw new Qcow2CorruptError(`refcount table at ${this.tableOffset} is not refcounted`);
    }
    const data = ioBuffer(this.#file, this.clusterSize);
    setRefcount(data, 0, this.order, 1);
    await this.#file.write(data, offset);
    await this.#file.flush();
    const entry = new Uint8Array(8);
    new DataView(entry.buffer).setBigUint64(0, BigInt(offset));
    await this.#file.write(entry, this.tableOffset + 8 * t);
    this.table[t] = offset;
    this.#blocks.add(offset);
    this.#cache.insertClean(offset, data);
  }

  async #growTable(needIndex: number): Promise<void> {
    const cs = this.clusterSize;
    const t0 = this.table.length;
    let b = 1;
    let entries = Math.max(Math.ceil(t0 * 1.5), needIndex + 2, t0 + 2);
    let k = 0;
    for (;;) {
      entries = Math.max(entries, t0 + b + 1);
      k = Math.ceil((entries * 8) / cs);
      const need = Math.ceil((b + k) / this.perBlock);
      if (need <= b) break;
      b = need;
    }
    entries = (k * cs) / 8;
    if (k * cs > MAX_REFTABLE_BYTES) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `refcount table would exceed ${MAX_REFTABLE_BYTES} bytes: image too large for its cluster size`,
      );
    }
    const area = t0 * this.perBlock; // first cluster of the area
    const blocks: Uint8Array[] = [];
    for (let j = 0; j < b; j++) {
      const data = ioBuffer(this.#file, cs);
      const rangeStart = (t0 + j) * this.perBlock;
      for (let c = area; c < area + b + k; c++) {
        if (c >= rangeStart && c < rangeStart + this.perBlock) {
          setRefcount(data, c - rangeStart, this.order, 1);
        }
      }
      blocks.push(data);
    }
    const newTable = this.table.slice();
    while (newTable.length < entries) newTable.push(0);
    for (let j = 0; j < b; j++) newTable[t0 + j] = (area + j) * cs;
    const tableBuf = new Uint8Array(k * cs);
    const dv = new DataView(tableBuf.buffer);
    newTable.forEach((v, i) => {
      dv.setBigUint64(i * 8, BigInt(v));
    });
    for (let j = 0; j < b; j++) await this.#file.write(blocks[j]!, (area + j) * cs);
    const newTableOffset = (area + b) * cs;
    await this.#file.write(tableBuf, newTableOffset);
    await this.#file.flush();
    await this.#opts.writeHeaderReftable(newTableOffset, k);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = newTableOffset;
    this.tableClusters = k;
    for (let j = 0; j < b; j++) {
      this.#blocks.add((area + j) * cs);
      this.#cache.insertClean((area + j) * cs, blocks[j]!);
    }
    // Nothing refers to the old table any more.
    for (let c = 0; c < oldClusters; c++) await this.#change(oldOffset / cs + c, -1);
  }

  /**
   * Writes a block back. Writes of one block are chained: each copies the block when the
   * previous write has completed, so the last write to land is always the newest content.
   */
  #writeEntry(e: CacheEntry): Promise<void> {
    const prev = this.#writing.get(e.offset);
    const p = (async () => {
      if (prev) await prev.catch(() => {});
      if (!e.dirty) return;
      await this.#cache.writeBack(e, (b, o) => this.#file.write(b, o));
    })();
    this.#writing.set(e.offset, p);
    const done = () => {
      if (this.#writing.get(e.offset) === p) this.#writing.delete(e.offset);
    };
    p.then(done, done);
    return p;
  }

  /**
   * Writes every dirty refcount block and waits for writes already in flight (evictions),
   * so that a flush of the file after it covers every refcount change made before the call.
   */
  async writeDirty(): Promise<boolean> {
    const dirty = this.#cache.dirtyEntries();
    const inFlight = [...this.#writing.values()];
    await Promise.all([...dirty.map((e) => this.#writeEntry(e)), ...inFlight]);
    return dirty.length > 0;
  }

  get hasDirty(): boolean {
    return this.#cache.dirtyEntries().length > 0;
  }
}
