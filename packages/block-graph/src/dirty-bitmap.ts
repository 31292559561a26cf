// Dirty bitmaps, in memory (QEMU's block/dirty-bitmap.c over util/hbitmap.c): one bit per
// `granularity` bytes of a node, set by every write that reaches the node (the generic
// write layer marks them: node-dirty.ts), reset by whoever consumes them (mirror, backup).
//
// The bits are 32-bit words with a summary level above (one bit per non-zero word), so
// that finding the next dirty range skips clean areas 1024 granules at a time, as hbitmap's
// levels do; the count of dirty bits is kept as bits change.

import { BlockError, BlockErrorCode } from './errors.ts';

/** Smallest and largest granularity QEMU accepts (block-dirty-bitmap-add). */
export const MIN_GRANULARITY = 512;
export const MAX_GRANULARITY = 2 ** 31;

/** One entry of query-block's dirty-bitmaps (QEMU's BlockDirtyInfo). */
export interface BlockDirtyInfo {
  name?: string;
  count: number;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  /** Present (true) only for a bitmap found in use at open (QEMU leaves it out otherwise). */
  inconsistent?: boolean;
}

/** QEMU bdrv_get_default_bitmap_granularity: the cluster size, within 4 KiB .. 64 KiB. */
export function defaultGranularity(clusterSize: number | undefined): number {
  if (clusterSize === undefined || clusterSize <= 0) return 65536;
  return Math.min(65536, Math.max(4096, clusterSize));
}

/** Throws QEMU's error (block-dirty-bitmap-add) for a granularity not a power of two in 512 B .. 2 GiB. */
export function checkGranularity(granularity: number): void {
  if (
    !Number.isSafeInteger(granularity) ||
    granularity < MIN_GRANULARITY ||
    granularity > MAX_GRANULARITY ||
    (granularity & (granularity - 1)) !== 0
  ) {
    throw new BlockError(
      BlockErrorCode.BAD_OPTION,
      granularity > MAX_GRANULARITY
        ? 'Granularity must be at most 2147483648'
        : 'Granularity must be power of 2 and at least 512',
    );
  }
}

function popcount(x: number): number {
  let v = x - ((x >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Index of the lowest set bit of a non-zero 32-bit word. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}

export class BdrvDirtyBitmap {
  /** The name (bitmaps of jobs have none). */
  readonly name: string | undefined;
  /** Bytes per bit, a power of two. */
  readonly granularity: number;
  /** Recording: writes to the node set bits (block-dirty-bitmap-enable / -disable). */
  enabled = true;
  /** In use by an operation (a job, an NBD export): not to be changed by the user. */
  busy = false;
  /** Stored in the image (qcow2's bitmaps extension); in-memory bitmaps are not. */
  persistent = false;
  /** Loaded from an image opened read-only: may not be changed (QEMU's bitmap->readonly). */
  readOnly = false;
  /** Found in use in the image (a crash left it unsaved): may only be removed. */
  inconsistent = false;
  #size: number;
  #words: Uint32Array;
  /** Bit i set: word i is not zero. */
  #summary: Uint32Array;
  #bits = 0;

  constructor(size: number, granularity: number, name?: string) {
    checkGranularity(granularity);
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new BlockError(BlockErrorCode.BAD_OPTION, `bad bitmap size ${size}`);
    }
    this.name = name;
    this.granularity = granularity;
    this.#size = size;
    this.#words = new Uint32Array(Math.ceil(this.#granules(size) / 32));
    this.#summary = new Uint32Array(Math.ceil(this.#words.length / 32));
  }

  /** The size in bytes of the node it tracks. */
  get size(): number {
    return this.#size;
  }

  /** Bytes dirty (bits set times the granularity; QEMU bdrv_get_dirty_count). */
  count(): number {
    return this.#bits * this.granularity;
  }

  #granules(bytes: number): number {
    return Math.ceil(bytes / this.granularity);
  }

  /** Whether the granule holding `offset` is dirty. */
  get(offset: number): boolean {
    if (offset < 0 || offset >= this.#size) return false;
    const bit = Math.floor(offset / this.granularity);
    return ((this.#words[bit >>> 5]! >>> (bit & 31)) & 1) !== 0;
  }

  /** Marks [offset, +bytes) dirty: every granule it touches. */
  set(offset: number, bytes: number): void {
    this.#changeBytes(offset, bytes, true);
  }

  /** Marks [offset, +bytes) clean: every granule it touches (QEMU resets whole granules). */
  reset(offset: number, bytes: number): void {
    this.#changeBytes(offset, bytes, false);
  }

  /** Clears every bit (bdrv_clear_dirty_bitmap). */
  clear(): void {
    this.#words.fill(0);
    this.#summary.fill(0);
    this.#bits = 0;
  }

  /** The granules that [offset, +bytes) touches, within the size (set or reset per write). */
  #changeBytes(offset: number, bytes: number, value: boolean): void {
    const end = Math.min(offset + bytes, this.#size);
    if (bytes <= 0 || offset >= end) return;
    const g = this.granularity;
    this.#change(Math.floor(offset / g), Math.ceil(end / g), value);
  }

  #change(first: number, end: number, value: boolean): void {
    const words = this.#words;
    for (let w = first >>> 5; w <= (end - 1) >>> 5; w++) {
      const lo = w === first >>> 5 ? first & 31 : 0;
      const hi = w === (end - 1) >>> 5 ? ((end - 1) & 31) + 1 : 32;
      const mask = hi - lo === 32 ? 0xffffffff : (((1 << (hi - lo)) - 1) << lo) >>> 0;
      const old = words[w]!;
      const next = value ? (old | mask) >>> 0 : (old & ~mask) >>> 0;
      if (next === old) continue;
      words[w] = next;
      this.#bits += popcount(next) - popcount(old);
      const s = w >>> 5;
      const sb = 1 << (w & 31);
      this.#summary[s] =
        next !== 0 ? (this.#summary[s]! | sb) >>> 0 : (this.#summary[s]! & ~sb) >>> 0;
    }
  }

  /** The first dirty granule at or after granule `bit`, or -1. */
  #nextSetBit(bit: number): number {
    const words = this.#words;
    const nwords = words.length;
    let w = bit >>> 5;
    if (w >= nwords) return -1;
    const first = words[w]! & (0xffffffff << (bit & 31));
    if (first !== 0) return (w << 5) + ctz(first);
    // Then by the summary: the next non-zero word after w.
    w++;
    const summary = this.#summary;
    let s = w >>> 5;
    if (s >= summary.length) return -1;
    let bits = (w & 31) === 0 ? summary[s]! : summary[s]! & (0xffffffff << (w & 31));
    for (;;) {
      if (bits !== 0) {
        const wi = (s << 5) + ctz(bits);
        return (wi << 5) + ctz(words[wi]!);
      }
      if (++s >= summary.length) return -1;
      bits = summary[s]!;
    }
  }

  /** The first clean granule at or after granule `bit` (the granule count when none). */
  #nextZeroBit(bit: number): number {
    const words = this.#words;
    const total = this.#granules(this.#size);
    let w = bit >>> 5;
    if (w >= words.length) return total;
    let inv = ~words[w]! & (0xffffffff << (bit & 31));
    while (inv === 0) {
      if (++w >= words.length) return total;
      inv = ~words[w]!;
    }
    return Math.min(total, (w << 5) + ctz(inv));
  }

  /** The offset of the first dirty byte at or after `offset` below `end`, or -1 (next_dirty). */
  nextDirty(offset: number, end = this.#size): number {
    if (offset >= Math.min(end, this.#size)) return -1;
    const g = this.granularity;
    const bit = this.#nextSetBit(Math.floor(Math.max(0, offset) / g));
    if (bit < 0) return -1;
    const at = Math.max(offset, bit * g);
    return at < Math.min(end, this.#size) ? at : -1;
  }

  /** The offset of the first clean byte at or after `offset` below `end`, or -1 (next_zero). */
  nextZero(offset: number, end = this.#size): number {
    const stop = Math.min(end, this.#size);
    if (offset >= stop) return -1;
    const g = this.granularity;
    const bit = this.#nextZeroBit(Math.floor(Math.max(0, offset) / g));
    const at = Math.max(offset, bit * g);
    return at < stop ? at : -1;
  }

  /**
   * The first dirty range at or after `offset`, below `end`, at most `maxBytes` long
   * (bdrv_dirty_bitmap_next_dirty_area), or undefined when all of it is clean.
   */
  nextDirtyArea(
    offset: number,
    end = this.#size,
    maxBytes = Number.MAX_SAFE_INTEGER,
  ): { offset: number; length: number } | undefined {
    const stop = Math.min(end, this.#size);
    const start = this.nextDirty(offset, stop);
    if (start < 0) return undefined;
    const limit = Math.min(stop, start + maxBytes);
    const zero = this.nextZero(start, limit);
    return { offset: start, length: (zero < 0 ? limit : zero) - start };
  }

  /** Each dirty range of [offset, end), in order (a snapshot of the bits as it goes). */
  *dirtyRanges(offset = 0, end = this.#size): Generator<{ offset: number; length: number }> {
    let pos = offset;
    for (;;) {
      const r = this.nextDirtyArea(pos, end);
      if (!r) return;
      yield r;
      pos = r.offset + r.length;
    }
  }

  /** Sets every bit that `other` has set (bdrv_merge_dirty_bitmap); sizes and granularities must match. */
  merge(other: BdrvDirtyBitmap): void {
    if (other.granularity !== this.granularity || other.size !== this.#size) {
      for (const r of other.dirtyRanges()) this.set(r.offset, r.length);
      return;
    }
    const src = other.#words;
    for (let w = 0; w < src.length; w++) {
      const add = src[w]!;
      if (add === 0) continue;
      const old = this.#words[w]!;
      const next = (old | add) >>> 0;
      if (next === old) continue;
      this.#words[w] = next;
      this.#bits += popcount(next) - popcount(old);
      this.#summary[w >>> 5] = (this.#summary[w >>> 5]! | (1 << (w & 31))) >>> 0;
    }
  }

  /** The node's size changed (bdrv_dirty_bitmap_truncate): new granules are clean. */
  truncate(size: number): void {
    const old = this.#size;
    if (size === old) return;
    const cut = Math.ceil(size / this.granularity) * this.granularity;
    if (cut < old) this.reset(cut, old - cut);
    // A partial last granule keeps its bit; granules past the end are dropped.
    const words = new Uint32Array(Math.ceil(this.#granules(size) / 32));
    words.set(this.#words.subarray(0, Math.min(words.length, this.#words.length)));
    this.#size = size;
    this.#words = words;
    this.#summary = new Uint32Array(Math.ceil(words.length / 32));
    this.#bits = 0;
    for (let w = 0; w < words.length; w++) {
      if (words[w] === 0) continue;
      this.#bits += popcount(words[w]!);
      this.#summary[w >>> 5] = (this.#summary[w >>> 5]! | (1 << (w & 31))) >>> 0;
    }
  }

  /** Bytes of the serialized bits: one bit per granule, least significant bit first. */
  get serializedSize(): number {
    return Math.ceil(this.#granules(this.#size) / 8);
  }

  /**
   * The bits from byte `byteOffset` of the serialized form (hbitmap_serialize_part: bit i
   * of the bitmap is bit i % 8 of byte i / 8, as qcow2 stores it) into `out`; zeros past
   * the end.
   */
  serializeBytes(byteOffset: number, out: Uint8Array): void {
    const words = this.#words;
    for (let j = 0; j < out.byteLength; j++) {
      const b = byteOffset + j;
      const w = words[b >>> 2];
      out[j] = w === undefined ? 0 : (w >>> ((b & 3) * 8)) & 0xff;
    }
  }

  /** Replaces the bits of serialized bytes [byteOffset, +data.length) (deserialize_part). */
  deserializeBytes(byteOffset: number, data: Uint8Array): void {
    const words = this.#words;
    const total = this.#granules(this.#size);
    const first = byteOffset >>> 2;
    const last = Math.min(words.length, (byteOffset + data.byteLength + 3) >>> 2);
    for (let w = first; w < last; w++) {
      let v = words[w]!;
      for (let k = 0; k < 4; k++) {
        const j = w * 4 + k - byteOffset;
        if (j < 0 || j >= data.byteLength) continue;
        v = ((v & ~(0xff << (k * 8))) | (data[j]! << (k * 8))) >>> 0;
      }
      // Bits past the last granule stay clear.
      const base = w << 5;
      if (base + 32 > total) v = total <= base ? 0 : (v & ((1 << (total - base)) - 1)) >>> 0;
      this.#bits += popcount(v) - popcount(words[w]!);
      words[w] = v;
      const sb = 1 << (w & 31);
      const s = w >>> 5;
      this.#summary[s] = v !== 0 ? (this.#summary[s]! | sb) >>> 0 : (this.#summary[s]! & ~sb) >>> 0;
    }
  }

  /** query-block's entry for it (BlockDirtyInfo). */
  info(): BlockDirtyInfo {
    return {
      ...(this.name !== undefined && { name: this.name }),
      count: this.count(),
      granularity: this.granularity,
      recording: this.enabled,
      busy: this.busy,
      persistent: this.persistent,
      ...(this.inconsistent && { inconsistent: true }),
    };
  }
}
