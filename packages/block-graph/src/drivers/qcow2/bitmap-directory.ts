// The on-disk structures of qcow2's bitmaps extension (docs/interop/qcow2.txt, "Bitmaps
// extension"): the header extension (count, directory size and offset), the bitmap
// directory (one entry per bitmap: table offset and size, flags, granularity, name) and
// the bitmap tables (one u64 per cluster of bitmap data: its host offset, 0 for all zeros,
// or bit 0 for all ones). Encoding and decoding only; bitmaps.ts does the I/O.

import { Qcow2CorruptError } from '../../errors.ts';
import { Autoclear, ExtType, type Qcow2Header } from './header.ts';
import type { Qcow2File } from './types.ts';

/** Directory entry flags. */
export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 4;
const KNOWN_FLAGS = BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE;
/** The only bitmap type: dirty tracking. */
export const BT_DIRTY_TRACKING_BITMAP = 1;
/** Bitmap table entry: bits 9-55 are the host offset; bit 0 with offset 0: all ones. */
export const BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;
export const BME_TABLE_ENTRY_FLAG_ALL_ONES = 1n;

/** The bitmaps extension of the header. */
export interface BitmapsExt {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

/** One bitmap directory entry. */
export interface BitmapDirEntry {
  tableOffset: number;
  /** Entries of the bitmap table (clusters of bitmap data). */
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  /** Extra data, kept as found (only with the extra_data_compatible flag may it be kept). */
  extraData: Uint8Array;
}

const enc = new TextEncoder();
const dec = new TextDecoder('utf-8');

function corrupt(why: string): Qcow2CorruptError {
  return new Qcow2CorruptError(`bitmaps extension: ${why}`);
}

/** The bitmaps extension of a header, or null when it has none. */
export function readBitmapsExt(h: Qcow2Header): BitmapsExt | null {
  const ext = h.otherExtensions.find((e) => e.type === ExtType.BITMAPS);
  if (!ext) return null;
  if (ext.data.byteLength < 24) throw corrupt('header extension too short');
  const dv = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  if (dv.getUint32(4) !== 0) throw corrupt('reserved field is not zero');
  return {
    nbBitmaps: dv.getUint32(0),
    directorySize: Number(dv.getBigUint64(8)),
    directoryOffset: Number(dv.getBigUint64(16)),
  };
}

/** Sets (or, with null, removes) the bitmaps extension of a header. */
export function setBitmapsExt(h: Qcow2Header, ext: BitmapsExt | null): void {
  const i = h.otherExtensions.findIndex((e) => e.type === ExtType.BITMAPS);
  if (ext === null) {
    if (i >= 0) h.otherExtensions.splice(i, 1);
    return;
  }
  const data = new Uint8Array(24);
  const dv = new DataView(data.buffer);
  dv.setUint32(0, ext.nbBitmaps);
  dv.setBigUint64(8, BigInt(ext.directorySize));
  dv.setBigUint64(16, BigInt(ext.directoryOffset));
  if (i >= 0) h.otherExtensions[i] = { type: ExtType.BITMAPS, data };
  else h.otherExtensions.push({ type: ExtType.BITMAPS, data });
}

/** Bytes of a directory entry with that name and extra data (padded to 8). */
export function dirEntrySize(nameBytes: number, extraData = 0): number {
  return Math.ceil((24 + extraData + nameBytes) / 8) * 8;
}

/** Parses `count` directory entries from `buf`. */
export function parseDirectory(buf: Uint8Array, count: number): BitmapDirEntry[] {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: BitmapDirEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 24 > buf.byteLength) throw corrupt('bitmap directory is truncated');
    const nameSize = dv.getUint16(off + 18);
    const extra = dv.getUint32(off + 20);
    const size = dirEntrySize(nameSize, extra);
    if (off + size > buf.byteLength) throw corrupt('bitmap directory is truncated');
    const entry: BitmapDirEntry = {
      tableOffset: Number(dv.getBigUint64(off)),
      tableSize: dv.getUint32(off + 8),
      flags: dv.getUint32(off + 12),
      type: dv.getUint8(off + 16),
      granularityBits: dv.getUint8(off + 17),
      extraData: buf.slice(off + 24, off + 24 + extra),
      name: dec.decode(buf.subarray(off + 24 + extra, off + 24 + extra + nameSize)),
    };
    if (entry.flags & ~KNOWN_FLAGS) {
      throw corrupt(`bitmap '${entry.name}' has unknown flags 0x${entry.flags.toString(16)}`);
    }
    if (entry.type !== BT_DIRTY_TRACKING_BITMAP) {
      throw corrupt(`bitmap '${entry.name}' has unknown type ${entry.type}`);
    }
    if (extra > 0 && !(entry.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)) {
      throw corrupt(`bitmap '${entry.name}' has extra data that is not compatible`);
    }
    out.push(entry);
    off += size;
  }
  return out;
}

/** The directory of `entries`, each padded to 8 bytes. */
export function serializeDirectory(entries: readonly BitmapDirEntry[]): Uint8Array {
  const names = entries.map((e) => enc.encode(e.name));
  const total = entries.reduce(
    (n, e, i) => n + dirEntrySize(names[i]!.byteLength, e.extraData.byteLength),
    0,
  );
  const buf = new Uint8Array(total);
  const dv = new DataView(buf.buffer);
  let off = 0;
  for (const [i, e] of entries.entries()) {
    const name = names[i]!;
    dv.setBigUint64(off, BigInt(e.tableOffset));
    dv.setUint32(off + 8, e.tableSize);
    dv.setUint32(off + 12, e.flags);
    dv.setUint8(off + 16, e.type);
    dv.setUint8(off + 17, e.granularityBits);
    dv.setUint16(off + 18, name.byteLength);
    dv.setUint32(off + 20, e.extraData.byteLength);
    buf.set(e.extraData, off + 24);
    buf.set(name, off + 24 + e.extraData.byteLength);
    off += dirEntrySize(name.byteLength, e.extraData.byteLength);
  }
  return buf;
}

/** Bitmap table entries: the host offset of each cluster of data (0: none), all-ones flag. */
export interface TableEntry {
  offset: number;
  allOnes: boolean;
}

export function parseTable(buf: Uint8Array, size: number, name: string): TableEntry[] {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: TableEntry[] = [];
  for (let i = 0; i < size; i++) {
    const v = dv.getBigUint64(i * 8);
    const offset = Number(v & BME_TABLE_ENTRY_OFFSET_MASK);
    const allOnes = (v & BME_TABLE_ENTRY_FLAG_ALL_ONES) !== 0n;
    if (v & ~(BME_TABLE_ENTRY_OFFSET_MASK | BME_TABLE_ENTRY_FLAG_ALL_ONES) || (allOnes && offset)) {
      throw corrupt(`bitmap '${name}' has a bad table entry ${i}`);
    }
    out.push({ offset, allOnes });
  }
  return out;
}

export function serializeTable(offsets: readonly number[], into: Uint8Array): void {
  const dv = new DataView(into.buffer, into.byteOffset, into.byteLength);
  for (const [i, o] of offsets.entries()) dv.setBigUint64(i * 8, BigInt(o));
}

/**
 * Counts the clusters the bitmaps extension references (directory, tables, data) with
 * `inc`, as qemu-img check does; problems go to `errors`. An extension without its
 * autoclear bit is stale and references nothing (its clusters are leaks).
 */
export async function countBitmapReferences(
  file: Qcow2File,
  h: Qcow2Header,
  inc: (offset: number, bytes: number, what: string) => void,
  errors: string[],
): Promise<void> {
  if (!(h.autoclearFeatures & Autoclear.BITMAPS)) return;
  const read = async (offset: number, bytes: number) => {
    const buf = new Uint8Array(bytes);
    const n = bytes ? await file.read(buf, offset) : 0;
    return n < bytes ? null : buf;
  };
  try {
    const ext = readBitmapsExt(h);
    if (!ext) return;
    inc(ext.directoryOffset, ext.directorySize, 'bitmap directory');
    const dir = await read(ext.directoryOffset, ext.directorySize);
    if (!dir) throw corrupt('bitmap directory is truncated');
    for (const e of parseDirectory(dir, ext.nbBitmaps)) {
      if (e.tableSize === 0) continue;
      inc(e.tableOffset, e.tableSize * 8, `bitmap table of '${e.name}'`);
      const t = await read(e.tableOffset, e.tableSize * 8);
      if (!t) throw corrupt(`bitmap table of '${e.name}' is truncated`);
      const cs = 2 ** h.clusterBits;
      for (const x of parseTable(t, e.tableSize, e.name)) {
        if (x.offset !== 0) inc(x.offset, cs, `bitmap data of '${e.name}'`);
      }
    }
  } catch (err) {
    errors.push(`ERROR ${(err as Error).message}`);
  }
}

/** One bitmap as qemu-img info lists it (QEMU's Qcow2BitmapInfo). */
export interface Qcow2BitmapInfo {
  flags: ('in-use' | 'auto')[];
  name: string;
  granularity: number;
}

/**
 * The bitmaps of an image as its directory says (qcow2_get_bitmap_info_list), or undefined
 * when it has none, or none that count: without the autoclear bit they are stale.
 */
export async function bitmapInfoList(
  file: Pick<Qcow2File, 'read'>,
  h: Qcow2Header,
): Promise<Qcow2BitmapInfo[] | undefined> {
  const ext = readBitmapsExt(h);
  if (!ext || ext.nbBitmaps === 0 || !(h.autoclearFeatures & Autoclear.BITMAPS)) return undefined;
  const buf = new Uint8Array(ext.directorySize);
  if ((await file.read(buf, ext.directoryOffset)) < buf.byteLength)
    throw corrupt('bitmap directory is truncated');
  return parseDirectory(buf, ext.nbBitmaps).map((e) => ({
    flags: [
      ...(e.flags & BME_FLAG_IN_USE ? (['in-use'] as const) : []),
      ...(e.flags & BME_FLAG_AUTO ? (['auto'] as const) : []),
    ],
    name: e.name,
    granularity: 2 ** e.granularityBits,
  }));
}
