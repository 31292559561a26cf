// Guest-to-host cluster mapping (docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2
// Entries"): geometry, L1/L2 entry encoding, and the L1 table with its L2 table cache.
//
// An L2 entry is decoded into subcluster bitmaps so that standard and extended L2 tables are
// handled by the same code: a standard table has one "subcluster" per cluster.

import { Qcow2CorruptError } from '../../errors.ts';
import { decodeCompressed } from './compress.ts';

export const L1E_OFFSET_MASK_HI = 0x00ffffff; // bits 32..55 of the offset
export const COPIED_HI = 0x80000000;
export const COMPRESSED_HI = 0x40000000;

export class Geometry {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  /** Bytes of one L2 entry (8, or 16 with extended L2). */
  readonly entryBytes: number;
  readonly l2Entries: number;
  /** Guest bytes mapped by one L2 table. */
  readonly l2Span: number;
  readonly subclusters: number;
  readonly subclusterSize: number;
  /** All subcluster bits set. */
  readonly fullMask: number;

  constructor(clusterBits: number, extendedL2: boolean) {
    this.clusterBits = clusterBits;
    this.clusterSize = 2 ** clusterBits;
    this.extendedL2 = extendedL2;
    this.entryBytes = extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.entryBytes;
    this.l2Span = this.l2Entries * this.clusterSize;
    this.subclusters = extendedL2 ? 32 : 1;
    this.subclusterSize = this.clusterSize / this.subclusters;
    this.fullMask = extendedL2 ? 0xffffffff : 1;
  }
}

/** A decoded L2 entry. */
export interface L2Entry {
  compressed: boolean;
  /** Normal: host cluster offset (0 = none). Compressed: host byte offset of the data. */
  host: number;
  /** Refcount is exactly one (bit 63). */
  copied: boolean;
  /** Normal clusters: subclusters whose data is in the host cluster. */
  alloc: number;
  /** Normal clusters: subclusters that read as zeros. */
  zero: number;
  /** Compressed clusters: 512-byte sectors spanned. */
  sectors: number;
}

export const UNALLOCATED: Readonly<L2Entry> = Object.freeze({
  compressed: false,
  host: 0,
  copied: false,
  alloc: 0,
  zero: 0,
  sectors: 0,
});

/** The big-endian u32 at byte `o` of `t`. */
function u32(t: Uint8Array, o: number): number {
  return ((t[o]! << 24) | (t[o + 1]! << 16) | (t[o + 2]! << 8) | t[o + 3]!) >>> 0;
}

function putU32(t: Uint8Array, o: number, v: number): void {
  t[o] = v >>> 24;
  t[o + 1] = v >>> 16;
  t[o + 2] = v >>> 8;
  t[o + 3] = v;
}

/**
 * Decodes entry `i` of the L2 table `t`. Throws CORRUPT for entries that cannot be valid.
 * Bytes read directly (no DataView), and an all-zero entry answered by the shared
 * UNALLOCATED: this runs for every cluster of every request.
 */
export function decodeL2(t: Uint8Array, i: number, g: Geometry): L2Entry {
  const o = i * g.entryBytes;
  const hi = u32(t, o);
  const lo = u32(t, o + 4);
  if (hi === 0 && lo === 0 && (!g.extendedL2 || (u32(t, o + 8) === 0 && u32(t, o + 12) === 0))) {
    return UNALLOCATED;
  }
  if (hi & COMPRESSED_HI) {
    const c = decodeCompressed(hi, lo, g.clusterBits);
    if (c.offset >= 2 ** 56 || c.offset + c.sectors * 512 > Number.MAX_SAFE_INTEGER) {
      throw new Qcow2CorruptError(
        `L2 entry ${i}: compressed cluster offset ${c.offset} out of range`,
      );
    }
    return {
      compressed: true,
      host: c.offset,
      copied: false,
      alloc: 0,
      zero: 0,
      sectors: c.sectors,
    };
  }
  const host = (hi & L1E_OFFSET_MASK_HI) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
  if (host + g.clusterSize > Number.MAX_SAFE_INTEGER || host % g.clusterSize !== 0) {
    throw new Qcow2CorruptError(`L2 entry ${i} host offset ${host} is not cluster aligned`);
  }
  const copied = (hi & COPIED_HI) !== 0;
  if (g.extendedL2) {
    const alloc = u32(t, o + 12);
    const zero = u32(t, o + 8);
    if ((alloc & zero) !== 0) {
      throw new Qcow2CorruptError(`L2 entry ${i} has subclusters both allocated and zero`);
    }
    if (alloc !== 0 && host === 0) {
      throw new Qcow2CorruptError(`L2 entry ${i} has allocated subclusters but no host cluster`);
    }
    return { compressed: false, host, copied, alloc, zero, sectors: 0 };
  }
  const zeroFlag = lo & 1;
  return {
    compressed: false,
    host,
    copied,
    alloc: host !== 0 && !zeroFlag ? 1 : 0,
    zero: zeroFlag,
    sectors: 0,
  };
}

/** Encodes a normal entry into entry `i` of table `t`. */
export function encodeL2(t: Uint8Array, i: number, e: L2Entry, g: Geometry): void {
  const o = i * g.entryBytes;
  const hi = Math.floor(e.host / 2 ** 32) | (e.copied && e.host !== 0 ? COPIED_HI : 0);
  let lo = e.host % 2 ** 32;
  if (g.extendedL2) {
    putU32(t, o, hi);
    putU32(t, o + 4, lo);
    putU32(t, o + 8, e.zero);
    putU32(t, o + 12, e.alloc);
    return;
  }
  if (e.zero) lo = (lo | 1) >>> 0;
  putU32(t, o, hi);
  putU32(t, o + 4, lo);
}

/** Reads the L1 table as raw [hi, lo] words. */
export function parseL1(buf: Uint8Array): { offsets: number[]; copied: boolean[] } {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = buf.length / 8;
  const offsets = new Array<number>(n);
  const copied = new Array<boolean>(n);
  for (let i = 0; i < n; i++) {
    const hi = dv.getUint32(i * 8);
    const lo = dv.getUint32(i * 8 + 4);
    offsets[i] = (hi & L1E_OFFSET_MASK_HI) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    copied[i] = (hi & COPIED_HI) !== 0;
    if ((lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0 || offsets[i]! > Number.MAX_SAFE_INTEGER) {
      throw new Qcow2CorruptError(`L1 entry ${i} has reserved bits set`);
    }
  }
  return { offsets, copied };
}

export function encodeL1(dv: DataView, at: number, offset: number, copied: boolean): void {
  dv.setUint32(at, (Math.floor(offset / 2 ** 32) | (copied && offset ? COPIED_HI : 0)) >>> 0);
  dv.setUint32(at + 4, offset % 2 ** 32);
}

/** Writes a compressed cluster descriptor (bit 62 set; extended L2: no subcluster bits). */
export function encodeL2Compressed(
  t: Uint8Array,
  i: number,
  hi: number,
  lo: number,
  g: Geometry,
): void {
  const dv = new DataView(t.buffer, t.byteOffset + i * g.entryBytes, g.entryBytes);
  dv.setUint32(0, hi >>> 0);
  dv.setUint32(4, lo >>> 0);
  if (g.extendedL2) {
    dv.setUint32(8, 0);
    dv.setUint32(12, 0);
  }
}
