// The `bochs` format driver (read-only): Bochs "Redolog"/"Growing" sparse images, v1 and
// v2 headers (QEMU block/bochs.c; docs/images.md). Little-endian; a catalog of
// extents, each with a bitmap of which 512-byte sectors hold data.

import type { BdrvChild, BlockDriver, FormatInstance, Mapping } from '../driver.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';

const HEADER_SIZE = 512;
const MAGIC = 'Bochs Virtual HD Image';
const REDOLOG = 'Redolog';
const GROWING = 'Growing';
const V1 = 0x00010000;
const V2 = 0x00020000;
const UNALLOCATED = 0xffffffff;
const SECTOR = 512;

function cstring(buf: Uint8Array, start: number, length: number): string {
  const bytes = buf.subarray(start, start + length);
  const end = bytes.indexOf(0);
  return Buffer.from(bytes.subarray(0, end === -1 ? length : end)).toString('latin1');
}

function corrupt(node: string, why: string): BlockError {
  return new BlockError(BlockErrorCode.CORRUPT_IMAGE, `bochs image of node '${node}': ${why}`);
}

export interface BochsHeader {
  version: number;
  headerSize: number;
  catalogEntries: number;
  bitmapSize: number;
  extentSize: number;
  diskSize: number;
}

/** Parses and checks a bochs header (512 bytes); throws CORRUPT_IMAGE naming the problem. */
export function parseBochsHeader(buf: Uint8Array, node: string, fileSize: number): BochsHeader {
  if (buf.byteLength < HEADER_SIZE) throw corrupt(node, 'file is shorter than the 512-byte header');
  const v = new DataView(buf.buffer, buf.byteOffset, HEADER_SIZE);
  if (cstring(buf, 0, 32) !== MAGIC) throw corrupt(node, `bad magic (not '${MAGIC}')`);
  if (cstring(buf, 32, 16) !== REDOLOG)
    throw corrupt(node, `bad type '${cstring(buf, 32, 16)}' (not '${REDOLOG}')`);
  const subtype = cstring(buf, 48, 16);
  if (subtype !== GROWING)
    throw corrupt(node, `unsupported subtype '${subtype}' (only '${GROWING}')`);
  const version = v.getUint32(64, true);
  if (version !== V1 && version !== V2) {
    throw corrupt(node, `unsupported version 0x${version.toString(16)} (0x10000 or 0x20000)`);
  }
  const headerSize = v.getUint32(68, true);
  const catalogEntries = v.getUint32(72, true);
  const bitmapSize = v.getUint32(76, true);
  const extentSize = v.getUint32(80, true);
  const diskSize = Number(v.getBigUint64(version === V1 ? 84 : 88, true));
  if (headerSize < HEADER_SIZE) throw corrupt(node, `header size ${headerSize} is below 512`);
  if (extentSize < SECTOR) throw corrupt(node, `extent size ${extentSize} is below 512`);
  if ((extentSize & (extentSize - 1)) !== 0)
    throw corrupt(node, `extent size ${extentSize} is not a power of two`);
  if (extentSize > 0x800000) throw corrupt(node, `extent size ${extentSize} is above 8 MiB`);
  if (catalogEntries > 0x100000)
    throw corrupt(node, `catalog of ${catalogEntries} entries is too large`);
  if (!Number.isSafeInteger(diskSize)) throw corrupt(node, 'disk size is too large');
  if (catalogEntries < Math.ceil(diskSize / extentSize)) {
    throw corrupt(
      node,
      `catalog of ${catalogEntries} entries is too small for a disk of ${diskSize} bytes`,
    );
  }
  if (bitmapSize === 0) throw corrupt(node, 'bitmap size is 0');
  if (bitmapSize * 8 < extentSize / SECTOR) {
    throw corrupt(
      node,
      `bitmap of ${bitmapSize} bytes cannot cover an extent of ${extentSize} bytes`,
    );
  }
  if (headerSize + 4 * catalogEntries > fileSize) {
    throw corrupt(
      node,
      `catalog (${catalogEntries} entries at ${headerSize}) runs past the end of the file`,
    );
  }
  return { version, headerSize, catalogEntries, bitmapSize, extentSize, diskSize };
}

class BochsInstance implements FormatInstance {
  readonly kind = 'format';
  private readonly size_: number;
  private readonly dataOffset: number;
  private readonly bitmapBlocks: number;
  private readonly extentBlocks: number;
  /** Bitmaps read so far, by extent index. */
  private readonly bitmaps = new Map<number, Promise<Uint8Array>>();

  private readonly file: BdrvChild;
  private readonly h: BochsHeader;
  private readonly catalog: Uint32Array;

  constructor(file: BdrvChild, h: BochsHeader, catalog: Uint32Array) {
    this.file = file;
    this.h = h;
    this.catalog = catalog;
    // QEMU counts whole sectors: a trailing partial sector is not part of the disk.
    this.size_ = Math.floor(h.diskSize / SECTOR) * SECTOR;
    this.dataOffset = h.headerSize + 4 * h.catalogEntries;
    this.bitmapBlocks = 1 + Math.floor((h.bitmapSize - 1) / SECTOR);
    this.extentBlocks = 1 + Math.floor((h.extentSize - 1) / SECTOR);
  }

  size(): number {
    return this.size_;
  }

  private bitmapOffset(entry: number): number {
    return this.dataOffset + SECTOR * entry * (this.extentBlocks + this.bitmapBlocks);
  }

  private bitmap(extent: number, entry: number): Promise<Uint8Array> {
    let p = this.bitmaps.get(extent);
    if (!p) {
      const buf = new Uint8Array(this.h.bitmapSize);
      const off = this.bitmapOffset(entry);
      const node = this.file.node;
      const size = node.size();
      p = (
        off >= size
          ? Promise.resolve()
          : node.read(off, buf.subarray(0, Math.min(buf.byteLength, size - off)))
      ).then(() => buf);
      this.bitmaps.set(extent, p);
      p.catch(() => this.bitmaps.delete(extent));
    }
    return p;
  }

  async map(offset: number, length: number): Promise<Mapping> {
    const es = this.h.extentSize;
    const extent = Math.floor(offset / es);
    const inExtent = offset - extent * es;
    const room = Math.min(length, es - inExtent);
    const entry = this.catalog[extent]!;
    if (entry === UNALLOCATED) return { length: room, kind: 'zero' };
    const bitmap = await this.bitmap(extent, entry);
    const sector = Math.floor(inExtent / SECTOR);
    const bit = (s: number) => ((bitmap[s >> 3]! >> (s & 7)) & 1) === 1;
    const set = bit(sector);
    // Extend the answer over the following sectors in the same state.
    let end = (sector + 1) * SECTOR;
    while (end < inExtent + room && bit(end / SECTOR) === set) end += SECTOR;
    const len = Math.min(end, inExtent + room) - inExtent;
    if (!set) return { length: len, kind: 'zero' };
    const base = this.bitmapOffset(entry) + SECTOR * this.bitmapBlocks;
    return { length: len, kind: 'data', child: this.file, offset: base + inExtent };
  }

  info(): Record<string, unknown> {
    return { version: this.h.version === V1 ? 1 : 2, 'extent-size': this.h.extentSize };
  }
}

export const bochsDriver: BlockDriver = {
  name: 'bochs',
  readOnlyOnly: true,
  options: {},
  children: [{ key: 'file', required: true, roles: () => ['data', 'metadata', 'primary'] }],
  async open(ctx) {
    const file = ctx.children.file!;
    const node = file.node;
    const fileSize = node.size();
    const header = new Uint8Array(HEADER_SIZE);
    await node.read(0, header.subarray(0, Math.min(HEADER_SIZE, fileSize)));
    const h = parseBochsHeader(
      header.subarray(0, Math.min(HEADER_SIZE, fileSize)),
      ctx.nodeName,
      fileSize,
    );
    const raw = new Uint8Array(4 * h.catalogEntries);
    if (raw.byteLength > 0) await node.read(h.headerSize, raw);
    const view = new DataView(raw.buffer);
    const catalog = new Uint32Array(h.catalogEntries);
    for (let i = 0; i < h.catalogEntries; i++) catalog[i] = view.getUint32(4 * i, true);
    return new BochsInstance(file, h, catalog);
  },
};
