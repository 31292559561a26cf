// Image creation (what `qemu-img create -f qcow2` and the blockdev-create job do): header
// with extensions, refcount table and blocks, L1 table, and with preallocation the L2 tables
// and data clusters. Everything but the header is written first; the header last, then a
// flush, so that a crash during creation never leaves a file that looks like a valid image.

import { badOption } from '../../errors.ts';
import { encodeL1, encodeL2, Geometry } from './cluster-map.ts';
import {
  Compat,
  CompressionType,
  HEADER_V3_LENGTH,
  Incompat,
  l1EntriesFor,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  type Qcow2Header,
  STANDARD_FEATURE_NAMES,
  serializeHeader,
} from './header.ts';
import { setRefcount } from './refcount.ts';
import type { Qcow2File } from './types.ts';

export interface Qcow2CreateOptions {
  /** Virtual size in bytes, a multiple of 512. */
  size: number;
  /** Cluster size, a power of two from 512 B to 2 MiB (default 64 KiB). */
  clusterSize?: number;
  /** '0.10' (version 2) or '1.1' (version 3, the default). */
  compat?: '0.10' | '1.1';
  backingFile?: string;
  backingFormat?: string;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  /** off (default), metadata (L2 tables and data clusters allocated), full (data written). */
  preallocation?: 'off' | 'metadata' | 'full';
  /** Refcount width in bits, a power of two 1..64 (default 16; 16 with compat 0.10). */
  refcountBits?: number;
  compressionType?: 'zlib' | 'zstd';
}

/** Progress of creation in bytes written so far out of the total. */
export type Qcow2CreateProgress = (done: number, total: number) => void;

/** What createQcow2 lays out, computed from checked options. */
interface Plan {
  cs: number;
  clusterBits: number;
  size: number;
  v3: boolean;
  extendedL2: boolean;
  refcountOrder: number;
  prealloc: 'off' | 'metadata' | 'full';
  g: Geometry;
  l1Size: number;
  l1Clusters: number;
  nL2: number;
  nData: number;
  perBlock: number;
  blocks: number;
  tableClusters: number;
}

const NEEDS_V3 = 'compatibility level 1.1 and above (use version=v3 or greater)';

/**
 * Checks the options as createQcow2 would, without touching anything: what a caller runs
 * before it creates the file, so that bad options leave nothing behind. Throws a
 * BAD_OPTION Qcow2Error with QEMU's message.
 */
export function checkQcow2CreateOptions(options: Qcow2CreateOptions): void {
  plan(options);
}

function plan(options: Qcow2CreateOptions): Plan {
  const size = options.size;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw badOption(`Image size ${size} is not a non-negative integer`);
  }
  if (size % 512 !== 0) throw badOption('Image size must be a multiple of 512 bytes');
  const cs = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw badOption('Cluster size must be a power of two between 512 and 2048k');
  }
  if (options.compat !== undefined && options.compat !== '0.10' && options.compat !== '1.1') {
    throw badOption(`Parameter 'version' does not accept value '${options.compat}'`);
  }
  const v3 = (options.compat ?? '1.1') === '1.1';
  const extendedL2 = options.extendedL2 ?? false;
  const refcountBits = options.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw badOption('Refcount width must be a power of two and may not exceed 64 bits');
  }
  const compression = options.compressionType ?? 'zlib';
  if (compression !== 'zlib' && compression !== 'zstd') {
    throw badOption(`Parameter 'compression-type' does not accept value '${compression}'`);
  }
  if (!v3) {
    if (options.lazyRefcounts) throw badOption(`Lazy refcounts only supported with ${NEEDS_V3}`);
    if (refcountBits !== 16) {
      throw badOption(
        'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)',
      );
    }
    if (extendedL2) throw badOption(`Extended L2 entries are only supported with ${NEEDS_V3}`);
    if (compression !== 'zlib') {
      throw badOption(`Non-zlib compression type is only supported with ${NEEDS_V3}`);
    }
  }
  if (extendedL2 && cs < 16384) {
    throw badOption(
      'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes',
    );
  }
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    throw badOption('Backing format cannot be used without backing file');
  }
  const prealloc = options.preallocation ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata' && prealloc !== 'full') {
    throw badOption(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  }
  if (prealloc !== 'off' && options.backingFile !== undefined && !extendedL2) {
    throw badOption(
      'Backing file and preallocation can only be used at the same time if extended_l2 is on',
    );
  }
  const tooLarge = () =>
    badOption(
      "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
    );
  const g = new Geometry(clusterBits, extendedL2);
  const l1Size = l1EntriesFor(size, clusterBits, extendedL2);
  if (l1Size * 8 > MAX_L1_BYTES) throw tooLarge();
  const l1Clusters = Math.ceil((l1Size * 8) / cs); // none for an empty disk: nothing would refer to it
  const nL2 = prealloc === 'off' ? 0 : l1Size;
  const nData = prealloc === 'off' ? 0 : Math.ceil(size / cs);
  const perBlock = (cs * 8) >> refcountOrder;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters + nL2 + nData;
    const b = Math.ceil(total / perBlock);
    const t = Math.ceil((b * 8) / cs);
    if (b <= blocks && t <= tableClusters) break;
    blocks = Math.max(blocks, b);
    tableClusters = Math.max(tableClusters, t);
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) throw tooLarge();
  return {
    cs,
    clusterBits,
    size,
    v3,
    extendedL2,
    refcountOrder,
    prealloc,
    g,
    l1Size,
    l1Clusters,
    nL2,
    nData,
    perBlock,
    blocks,
    tableClusters,
  };
}

/**
 * Creates a qcow2 image in `file` (truncated first, once the options are checked: bad
 * options leave the file untouched). Precondition: nobody else uses the file.
 */
export async function createQcow2(
  file: Qcow2File,
  options: Qcow2CreateOptions,
  onProgress?: Qcow2CreateProgress,
): Promise<void> {
  const layout = plan(options);
  const { cs, clusterBits, size, v3, extendedL2, refcountOrder, prealloc, g } = layout;
  const { l1Size, l1Clusters, nL2, nData, perBlock, blocks, tableClusters } = layout;
  const tableOffset = cs;
  const blocksAt = tableOffset + tableClusters * cs;
  const l1Offset = blocksAt + blocks * cs;
  const l2At = l1Offset + l1Clusters * cs;
  const dataAt = l2At + nL2 * cs;
  const used = 1 + tableClusters + blocks + l1Clusters + nL2 + nData;
  const totalBytes = used * cs + (prealloc === 'full' ? 0 : 0);
  let done = 0;
  const progress = (n: number) => {
    done += n;
    onProgress?.(done, totalBytes);
  };

  await file.truncate(0);
  // Refcount blocks: every cluster in use has refcount 1.
  const table = new Uint8Array(tableClusters * cs);
  const tdv = new DataView(table.buffer);
  for (let j = 0; j < blocks; j++) {
    const block = new Uint8Array(cs);
    for (let i = 0; i < perBlock && j * perBlock + i < used; i++)
      setRefcount(block, i, refcountOrder, 1);
    await file.write(block, blocksAt + j * cs);
    tdv.setBigUint64(j * 8, BigInt(blocksAt + j * cs));
    progress(cs);
  }
  await file.write(table, tableOffset);
  progress(table.length);
  // L1 (and L2 tables pointing at data clusters when preallocating).
  const l1 = new Uint8Array(l1Clusters * cs);
  const l1dv = new DataView(l1.buffer);
  for (let i = 0; i < nL2; i++) {
    encodeL1(l1dv, i * 8, l2At + i * cs, true);
    const l2 = new Uint8Array(cs);
    for (let j = 0; j < g.l2Entries; j++) {
      const ci = i * g.l2Entries + j;
      if (ci >= nData) break;
      const alloc = options.backingFile !== undefined ? 0 : g.fullMask;
      encodeL2(
        l2,
        j,
        { compressed: false, host: dataAt + ci * cs, copied: true, alloc, zero: 0, sectors: 0 },
        g,
      );
    }
    await file.write(l2, l2At + i * cs);
    progress(cs);
  }
  await file.write(l1, l1Offset);
  progress(l1.length);
  if (prealloc === 'full') {
    const chunk = new Uint8Array(Math.min(nData * cs, 4 * 1024 * 1024));
    for (let p = 0; p < nData * cs; p += chunk.length) {
      const n = Math.min(chunk.length, nData * cs - p);
      await file.write(chunk.subarray(0, n), dataAt + p);
      progress(n);
    }
  } else if (nData > 0) {
    await file.truncate(dataAt + nData * cs);
    progress(nData * cs);
  }
  const h: Qcow2Header = {
    version: v3 ? 3 : 2,
    clusterBits,
    size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: tableOffset,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures:
      (extendedL2 ? Incompat.EXTENDED_L2 : 0n) |
      (options.compressionType === 'zstd' ? Incompat.COMPRESSION_TYPE : 0n),
    compatibleFeatures: options.lazyRefcounts ? Compat.LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder: v3 ? refcountOrder : 4,
    headerLength: v3 ? HEADER_V3_LENGTH : 72,
    compressionType:
      options.compressionType === 'zstd' ? CompressionType.ZSTD : CompressionType.ZLIB,
    extraFields: new Uint8Array(0),
    otherExtensions: [],
    backingFile: options.backingFile ?? null,
    backingFormat: options.backingFormat ?? null,
    featureNames: v3 ? STANDARD_FEATURE_NAMES : [],
  };
  const hdr = serializeHeader(h);
  await file.flush();
  await file.write(hdr, 0);
  await file.flush();
  progress(cs);
}
