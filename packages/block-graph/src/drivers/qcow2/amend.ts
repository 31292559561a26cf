// Changing an image's format options in place (what `qemu-img amend` does to qcow2,
// QEMU's qcow2_amend_options): compat (upgrade to v3, downgrade to v2), lazy_refcounts,
// refcount_bits. The checks come first, with QEMU's words, so that a refused amend
// changes nothing; then the upgrade, the refcount width, lazy refcounts, the downgrade,
// in QEMU's order.

import { Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { computeReferences, readHeader, rebuildRefcounts } from './check.ts';
import { decodeL2, encodeL2, UNALLOCATED } from './cluster-map.ts';
import { writeBack } from './flush.ts';
import {
  Compat,
  CompressionType,
  HEADER_V2_LENGTH,
  HEADER_V3_LENGTH,
  Incompat,
  STANDARD_FEATURE_NAMES,
  serializeHeader,
} from './header.ts';
import { openQcow2, type Qcow2Image } from './image.ts';
import { allocData } from './overlap.ts';
import { maxRefcount } from './refcount.ts';
import { readL1 } from './snapshot.ts';
import { readSnapshotTable } from './snapshot-table.ts';
import { type Qcow2State, writeHeader } from './state.ts';
import { ioBuffer, type Qcow2File, releaseIoBuffer } from './types.ts';

export interface Qcow2AmendOptions {
  /** compat: 2 (0.10) or 3 (1.1). */
  version?: 2 | 3;
  lazyRefcounts?: boolean;
  /** refcount_bits: a power of two from 1 to 64. */
  refcountBits?: number;
  /** size: the new virtual size. */
  size?: number;
}

const amendError = (message: string) => new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, message);

/** Progress of an amend, as QEMU's status callback reports it: `done` of `total`. */
export type AmendProgress = (done: number, total: number) => void;

/** Amends the qcow2 image in `file` (opened without its backing file). */
export async function amendQcow2(
  file: Qcow2File,
  o: Qcow2AmendOptions,
  progress: AmendProgress = () => {},
): Promise<void> {
  const h = await readHeader(file);
  const version = o.version ?? h.version;
  const refcountOrder = o.refcountBits === undefined ? h.refcountOrder : Math.log2(o.refcountBits);
  if (
    o.refcountBits !== undefined &&
    (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6)
  ) {
    throw amendError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountOrder !== 4) {
    throw amendError(
      o.refcountBits === undefined
        ? 'compat=0.10 requires refcount_bits=16'
        : 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
    );
  }
  const lazy = o.lazyRefcounts ?? (h.compatibleFeatures & Compat.LAZY_REFCOUNTS) !== 0n;
  if (version < 3 && o.lazyRefcounts === true) {
    throw amendError(
      'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
    );
  }
  if (version < h.version) {
    const other = h.incompatibleFeatures & ~(Incompat.DIRTY | Incompat.COMPRESSION_TYPE);
    if (other !== 0n) {
      throw amendError(
        `Cannot downgrade an image with incompatible features 0x${other.toString(16)} set`,
      );
    }
  }

  // Upgrade and lazy refcounts: header changes on the open image.
  await withImage(file, async (img) => {
    const s = img.state;
    if (version > s.header.version) {
      // QEMU's upgrade reports two steps: before and after the header.
      progress(0, 2);
      upgradeHeader(s);
      progress(1, 2);
      await writeHeader(s);
      progress(2, 2);
    }
    if (version === 3) {
      if (lazy) s.header.compatibleFeatures |= Compat.LAZY_REFCOUNTS;
      else s.header.compatibleFeatures &= ~Compat.LAZY_REFCOUNTS;
    }
    await writeHeader(s);
    if (o.size !== undefined && o.size !== s.header.size) await img.resize(o.size);
  });
  if (refcountOrder !== h.refcountOrder) await changeRefcountOrder(file, refcountOrder);
  if (version < h.version) await withImage(file, (img) => downgrade(img.state, progress));
}

async function withImage(file: Qcow2File, op: (img: Qcow2Image) => Promise<void>): Promise<void> {
  const img = await openQcow2(file, { backing: null, lazyRefcounts: false });
  try {
    await op(img);
  } finally {
    await img.close();
  }
}

function upgradeHeader(s: Qcow2State): void {
  const h = s.header;
  h.version = 3;
  h.headerLength = HEADER_V3_LENGTH;
  h.compressionType = CompressionType.ZLIB;
  h.featureNames = STANDARD_FEATURE_NAMES.slice();
}

/**
 * New refcount structures of the new width (QEMU's qcow2_change_refcount_order): every
 * count must fit. Works on the closed image's file.
 */
async function changeRefcountOrder(file: Qcow2File, order: number): Promise<void> {
  const h = await readHeader(file);
  const refs = await computeReferences(file, h, false);
  if (refs.errors.length > 0)
    throw amendError(`Cannot change the refcount width: ${refs.errors[0]}`);
  const max = maxRefcount(order);
  const cs = 2 ** h.clusterBits;
  for (let ci = 0; ci < refs.counts.length; ci++) {
    const n = refs.counts[ci]!;
    if (n > max) {
      throw amendError(
        `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset 0x${(ci * cs).toString(16)} has a refcount of ${n}`,
      );
    }
  }
  h.refcountOrder = order;
  await rebuildRefcounts(file, h, refs, async () => {
    await file.write(serializeHeader(h), 0);
    await file.flush();
  });
}

/**
 * To version 2 (QEMU's qcow2_downgrade): no zero clusters (v2 has no zero flag: a zero
 * cluster with a host cluster gets zeros written into it; one without becomes unallocated,
 * or with a backing file a new cluster of zeros), no lazy refcounts, the v2 header.
 */
async function downgrade(s: Qcow2State, progress: AmendProgress): Promise<void> {
  const h = s.header;
  if (h.compressionType !== CompressionType.ZLIB && (await hasCompressed(s))) {
    throw amendError(
      'Cannot downgrade an image with zstd compression type and existing compressed clusters',
    );
  }
  await writeBack(s);
  const l1s = [s.l1];
  for (const sn of await readSnapshotTable(s))
    l1s.push((await readL1(s, sn.l1TableOffset, sn.l1Size)).offsets);
  // Progress by L1 entries visited, of all the tables (QEMU's accounting).
  const total = l1s.reduce((n, l1) => n + l1.length, 0);
  let visited = 0;
  for (const l1 of l1s) {
    await expandZeroClusters(s, l1, () => progress(++visited, total));
  }
  await writeBack(s);
  h.version = 2;
  h.headerLength = HEADER_V2_LENGTH;
  h.incompatibleFeatures = 0n;
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  h.compressionType = CompressionType.ZLIB;
  h.extraFields = new Uint8Array(0);
  await writeHeader(s);
}

async function hasCompressed(s: Qcow2State): Promise<boolean> {
  const l1s = [s.l1];
  for (const sn of await readSnapshotTable(s))
    l1s.push((await readL1(s, sn.l1TableOffset, sn.l1Size)).offsets);
  for (const l1 of l1s) {
    for (const off of l1) {
      if (off === 0) continue;
      const t = await s.l2Cache.get(off);
      try {
        for (let j = 0; j < s.geom.l2Entries; j++)
          if (decodeL2(t.data, j, s.geom).compressed) return true;
      } finally {
        s.l2Cache.unpin(t);
      }
    }
  }
  return false;
}

async function expandZeroClusters(
  s: Qcow2State,
  l1: readonly number[],
  visited: () => void,
): Promise<void> {
  const g = s.geom;
  const cs = s.clusterSize;
  const zeros = ioBuffer(s.file, cs);
  try {
    for (const off of l1) {
      if (off === 0) {
        visited();
        continue;
      }
      const t = await s.l2Cache.get(off);
      try {
        const tableRefs = await s.refcounts.get(off / cs);
        for (let j = 0; j < g.l2Entries; j++) {
          const e = decodeL2(t.data, j, g);
          if (e.compressed || (e.zero & 1) === 0) continue;
          if (e.host !== 0) {
            await s.file.write(zeros, e.host);
            encodeL2(t.data, j, { ...e, alloc: 1, zero: 0 }, g);
          } else if (s.header.backingFile !== null) {
            // As many references as the table has (it may be shared by snapshots).
            const host = await allocData(s, 1);
            if (tableRefs > 1) await s.refcounts.update(host, cs, tableRefs - 1);
            await s.file.write(zeros, host);
            encodeL2(t.data, j, { ...e, host, alloc: 1, zero: 0, copied: tableRefs === 1 }, g);
          } else {
            encodeL2(t.data, j, UNALLOCATED, g);
          }
          s.l2Cache.markDirty(t);
        }
      } finally {
        s.l2Cache.unpin(t);
      }
      visited();
    }
  } finally {
    releaseIoBuffer(s.file, zeros);
  }
  await s.file.flush();
}
