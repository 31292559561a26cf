// The persistent dirty bitmaps of a qcow2 image (QEMU's qcow2-bitmap.c; docs/interop/
// qcow2.txt, "Bitmaps extension"), as the node layer's PersistentBitmapStore (driver.ts):
//
// - load (after open): the directory and each bitmap's data; a bitmap flagged in_use was
//   not stored since it was last opened for writing (a crash): it comes back inconsistent,
//   without data. Opened read-write, every bitmap is then flagged in_use on disk (the
//   directory rewritten in place, flushed) before any write can reach the image, so that a
//   crash from here on leaves them flagged;
// - store (before close): each persistent bitmap's data clusters and table are written to
//   new clusters, then a new directory, then the header points at it (autoclear bit set);
//   only then are the old directory, tables and data freed. A crash in between leaks
//   clusters, never loses the old bitmaps;
// - remove: the directory is rewritten without it, its clusters freed;
// - canStore: which new bitmaps the image can hold.
//
// The on-disk structures are bitmap-directory.ts's.

import { BdrvDirtyBitmap } from '../../dirty-bitmap.ts';
import type { PersistentBitmapStore } from '../../driver.ts';
import { badOption, Qcow2CorruptError } from '../../errors.ts';
import {
  type BitmapDirEntry,
  type BitmapsExt,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BT_DIRTY_TRACKING_BITMAP,
  dirEntrySize,
  parseDirectory,
  parseTable,
  readBitmapsExt,
  serializeDirectory,
  serializeTable,
  setBitmapsExt,
} from './bitmap-directory.ts';
import { Autoclear } from './header.ts';
import type { Qcow2Image } from './image.ts';
import { type Qcow2State, writeHeader } from './state.ts';
import { ioBuffer, releaseIoBuffer } from './types.ts';

/** Limits of the bitmaps extension (QEMU's qcow2-bitmap.c). */
export const BME_MAX_NAME_SIZE = 1023;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
/** Most bytes of bitmap data, and most bitmap table entries, one bitmap may have. */
export const BME_MAX_PHYS_SIZE = 0x20000000;
export const BME_MAX_TABLE_SIZE = 0x8000000;
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;

export class Qcow2Bitmaps implements PersistentBitmapStore {
  readonly #image: Qcow2Image;
  /** The directory as it is on disk now, and its place. */
  #entries: BitmapDirEntry[] = [];
  #ext: BitmapsExt | null = null;

  constructor(image: Qcow2Image) {
    this.#image = image;
  }

  get #s(): Qcow2State {
    return this.#image.state;
  }

  async load(): Promise<BdrvDirtyBitmap[]> {
    const s = this.#s;
    const ext = readBitmapsExt(s.header);
    // Without the autoclear bit a program that knows no bitmaps wrote the image since:
    // the extension is stale, ignored (as QEMU does; its clusters leak).
    if (!ext || !(s.header.autoclearFeatures & Autoclear.BITMAPS)) return [];
    const dir = await readBytes(s, ext.directoryOffset, ext.directorySize, 'bitmap directory');
    this.#entries = parseDirectory(dir, ext.nbBitmaps);
    this.#ext = ext;
    const out: BdrvDirtyBitmap[] = [];
    for (const e of this.#entries) {
      if (
        e.granularityBits < BME_MIN_GRANULARITY_BITS ||
        e.granularityBits > BME_MAX_GRANULARITY_BITS
      ) {
        throw new Qcow2CorruptError(`bitmap '${e.name}' has granularity bits ${e.granularityBits}`);
      }
      const b = new BdrvDirtyBitmap(s.header.size, 2 ** e.granularityBits, e.name);
      b.persistent = true;
      b.readOnly = s.readOnly;
      if (e.flags & BME_FLAG_IN_USE) {
        // Its bits are unknown: not recording, not to be used (QEMU's inconsistent bitmap).
        b.inconsistent = true;
        b.enabled = false;
      } else {
        b.enabled = (e.flags & BME_FLAG_AUTO) !== 0;
        await this.#readData(e, b);
      }
      out.push(b);
    }
    if (!s.readOnly && this.#entries.some((e) => !(e.flags & BME_FLAG_IN_USE))) {
      for (const e of this.#entries) e.flags |= BME_FLAG_IN_USE;
      await s.file.write(serializeDirectory(this.#entries), ext.directoryOffset);
      await s.file.flush();
    }
    return out;
  }

  /** The table entries a bitmap of this image needs (one per cluster of its data). */
  #tableSize(granularity: number): number {
    const bytes = Math.ceil(Math.ceil(this.#s.header.size / granularity) / 8);
    return Math.ceil(bytes / this.#s.clusterSize);
  }

  async #readTable(e: BitmapDirEntry) {
    const buf = await readBytes(this.#s, e.tableOffset, e.tableSize * 8, 'bitmap table');
    return parseTable(buf, e.tableSize, e.name);
  }

  async #readData(e: BitmapDirEntry, b: BdrvDirtyBitmap): Promise<void> {
    const s = this.#s;
    const cs = s.clusterSize;
    if (e.tableSize !== this.#tableSize(b.granularity)) {
      throw new Qcow2CorruptError(`bitmap '${e.name}' has a table of ${e.tableSize} entries`);
    }
    const table = await this.#readTable(e);
    const buf = ioBuffer(s.file, cs);
    try {
      for (const [k, t] of table.entries()) {
        const bytes = Math.min(cs, b.serializedSize - k * cs);
        if (t.allOnes) b.set(k * cs * 8 * b.granularity, cs * 8 * b.granularity);
        if (t.offset === 0) continue;
        const got = await s.file.read(buf, t.offset);
        if (got < bytes) throw new Qcow2CorruptError(`bitmap '${e.name}' data is truncated`);
        b.deserializeBytes(k * cs, buf.subarray(0, bytes));
      }
    } finally {
      releaseIoBuffer(s.file, buf);
    }
  }

  /** qcow2_co_can_store_new_dirty_bitmap, with its words. */
  canStore(name: string, granularity: number): void {
    const s = this.#s;
    if (s.header.version < 3) throw badOption('Cannot store dirty bitmaps in qcow2 v2 files');
    checkConstraints(s.header.size, s.clusterSize, name, granularity);
    const n = this.#entries.length;
    if (n === 0) return;
    if (n >= QCOW2_MAX_BITMAPS) {
      throw badOption('Maximum number of persistent bitmaps is already reached');
    }
    const dirSize = this.#ext?.directorySize ?? 0;
    if (dirSize + dirEntrySize(Buffer.byteLength(name)) > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
      throw badOption('Not enough space in the bitmap directory');
    }
  }

  async remove(name: string): Promise<void> {
    const gone = this.#entries.find((e) => e.name === name);
    if (!gone) return; // not stored yet
    const clusters = await this.#clustersOf(gone);
    await this.#writeDirectory(this.#entries.filter((e) => e !== gone));
    await this.#free(clusters);
  }

  async store(bitmaps: readonly BdrvDirtyBitmap[]): Promise<void> {
    const s = this.#s;
    if (s.readOnly || s.corrupt || s.closed) return;
    if (bitmaps.length === 0 && this.#entries.length === 0) return;
    const next: BitmapDirEntry[] = [];
    // QEMU's order: the bitmaps the directory has, where they are; then the new ones,
    // newest first (its list of a node's bitmaps).
    const known = (b: BdrvDirtyBitmap) => this.#entries.findIndex((e) => e.name === b.name);
    const ordered = [
      ...bitmaps.filter((b) => known(b) >= 0).sort((x, y) => known(x) - known(y)),
      ...bitmaps.filter((b) => known(b) < 0).reverse(),
    ];
    for (const b of ordered) {
      const prev = this.#entries.find((e) => e.name === b.name);
      // An inconsistent bitmap stays as it was found: in use, its clusters untouched.
      if (b.inconsistent && prev) next.push(prev);
      else if (!b.inconsistent) next.push(await this.#writeBitmap(b));
    }
    const old: { offset: number; bytes: number }[] = [];
    for (const e of this.#entries) if (!next.includes(e)) old.push(...(await this.#clustersOf(e)));
    await this.#writeDirectory(next);
    await this.#free(old);
  }

  /** Writes a bitmap's data and table to new clusters; its directory entry. */
  async #writeBitmap(b: BdrvDirtyBitmap): Promise<BitmapDirEntry> {
    const s = this.#s;
    const cs = s.clusterSize;
    const size = this.#tableSize(b.granularity);
    const offsets: number[] = [];
    const buf = ioBuffer(s.file, cs);
    try {
      for (let k = 0; k < size; k++) {
        const at = k * cs * 8 * b.granularity;
        // A cluster of data with no dirty bit is not stored (table entry 0).
        if (b.nextDirty(at, at + cs * 8 * b.granularity) < 0) {
          offsets.push(0);
          continue;
        }
        buf.fill(0);
        b.serializeBytes(k * cs, buf.subarray(0, Math.min(cs, b.serializedSize - k * cs)));
        const host = await s.refcounts.allocate(1);
        await s.file.write(buf, host);
        offsets.push(host);
      }
    } finally {
      releaseIoBuffer(s.file, buf);
    }
    const tableBytes = Math.ceil((size * 8) / cs) * cs;
    const table = ioBuffer(s.file, tableBytes);
    let tableOffset: number;
    try {
      table.fill(0);
      serializeTable(offsets, table);
      tableOffset = await s.refcounts.allocate(tableBytes / cs);
      await s.file.write(table, tableOffset);
    } finally {
      releaseIoBuffer(s.file, table);
    }
    return {
      tableOffset,
      tableSize: size,
      flags: b.enabled ? BME_FLAG_AUTO : 0,
      type: BT_DIRTY_TRACKING_BITMAP,
      granularityBits: Math.log2(b.granularity),
      name: b.name ?? '',
      extraData: new Uint8Array(0),
    };
  }

  /** The clusters a stored bitmap holds: its data and its table. */
  async #clustersOf(e: BitmapDirEntry): Promise<{ offset: number; bytes: number }[]> {
    const cs = this.#s.clusterSize;
    const out = (await this.#readTable(e))
      .filter((t) => t.offset !== 0)
      .map((t) => ({ offset: t.offset, bytes: cs }));
    if (e.tableSize > 0) out.push({ offset: e.tableOffset, bytes: e.tableSize * 8 });
    return out;
  }

  /**
   * Makes `entries` the image's directory: written to new clusters (what it points at is
   * on disk first), then the header; the old directory is freed after. No entries: the
   * extension and its autoclear bit go.
   */
  async #writeDirectory(entries: BitmapDirEntry[]): Promise<void> {
    const s = this.#s;
    const cs = s.clusterSize;
    const oldExt = this.#ext;
    let ext: BitmapsExt | null = null;
    if (entries.length > 0) {
      const dir = serializeDirectory(entries);
      const bytes = Math.ceil(dir.byteLength / cs) * cs;
      const buf = ioBuffer(s.file, bytes);
      try {
        buf.fill(0);
        buf.set(dir);
        const at = await s.refcounts.allocate(bytes / cs);
        await s.file.write(buf, at);
        ext = { nbBitmaps: entries.length, directorySize: dir.byteLength, directoryOffset: at };
      } finally {
        releaseIoBuffer(s.file, buf);
      }
    }
    await s.refcounts.writeDirty();
    await s.file.flush();
    setBitmapsExt(s.header, ext);
    if (ext) s.header.autoclearFeatures |= Autoclear.BITMAPS;
    else s.header.autoclearFeatures &= ~Autoclear.BITMAPS;
    await writeHeader(s);
    this.#entries = entries;
    this.#ext = ext;
    if (oldExt && oldExt.directorySize > 0) {
      await this.#free([{ offset: oldExt.directoryOffset, bytes: oldExt.directorySize }]);
    }
  }

  async #free(clusters: readonly { offset: number; bytes: number }[]): Promise<void> {
    if (clusters.length === 0) return;
    const s = this.#s;
    for (const c of clusters) await s.refcounts.update(c.offset, c.bytes, -1);
    // On disk now: the image stays tidy (no leak) even if the process dies before close.
    await s.refcounts.writeDirty();
    await s.file.flush();
  }
}

async function readBytes(s: Qcow2State, offset: number, bytes: number, what: string) {
  const buf = new Uint8Array(bytes);
  if (bytes === 0) return buf;
  const got = await s.file.read(buf, offset);
  if (got < bytes) throw new Qcow2CorruptError(`${what} at ${offset} is truncated`);
  return buf;
}

/** check_constraints_on_bitmap: granularity, size of its table and data, name length. */
export function checkConstraints(
  size: number,
  clusterSize: number,
  name: string,
  granularity: number,
): void {
  const bits = Math.log2(granularity);
  if (bits > BME_MAX_GRANULARITY_BITS) {
    throw badOption(`Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
  }
  if (bits < BME_MIN_GRANULARITY_BITS) {
    throw badOption(`Granularity is under minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`);
  }
  if (size > BME_MAX_PHYS_SIZE * 2 ** bits || size > BME_MAX_TABLE_SIZE * clusterSize * 2 ** bits) {
    throw badOption('Too much space will be occupied by the bitmap. Use larger granularity');
  }
  if (Buffer.byteLength(name) > BME_MAX_NAME_SIZE) {
    throw badOption(`Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
  }
}
