// Consistency check (refcounts against the references from header, L1, L2 and refcount
// structures, as QEMU's qcow2-refcount.c check does) and the refcount rebuild used when a
// dirty image (lazy refcounts) is opened read-write.
//
// Internal snapshots are walked (their L1 and L2 tables count like the active ones), and
// so are persistent bitmaps (directory, tables, data: bitmap-directory.ts).

import { Qcow2CorruptError } from '../../errors.ts';
import { countBitmapReferences } from './bitmap-directory.ts';
import { decodeL2, Geometry, parseL1 } from './cluster-map.ts';
import { Incompat, parseHeader, peekClusterBits, type Qcow2Header } from './header.ts';
import { getRefcount, maxRefcount, RefcountOverflowError, setRefcount } from './refcount.ts';
import type { Qcow2File } from './types.ts';

/** Clusters counted by the check: at most this many (larger files are refused). */
const MAX_CHECK_CLUSTERS = 2 ** 27;

export interface References {
  /** Expected refcount of each host cluster below the end of the file. */
  counts: Uint32Array;
  /** Problems found while walking (misaligned entries, references past the end, ...). */
  errors: string[];
  /** L1/L2 entries with their COPIED flag: [host cluster index, flag, description]. */
  copied: Array<[number, boolean, string]>;
  fileSize: number;
  notChecked: string[];
}

export interface Qcow2CheckResult {
  /** Clusters whose refcount is lower than their references, plus structural errors. */
  corruptions: number;
  /** Clusters whose refcount is higher than their references. */
  leaks: number;
  /** One line per problem, as qemu-img check prints them. */
  messages: string[];
  /** Parts of the image not examined (persistent bitmaps). */
  notChecked: string[];
  /** Host clusters referenced. */
  allocatedClusters: number;
  fileSize: number;
}

async function readExact(
  file: Qcow2File,
  length: number,
  offset: number,
): Promise<Uint8Array | null> {
  const buf = new Uint8Array(length);
  const n = length ? await file.read(buf, offset) : 0;
  return n < length ? null : buf;
}

export async function readHeader(file: Qcow2File): Promise<Qcow2Header> {
  const first = new Uint8Array(512);
  const n0 = await file.read(first, 0);
  const bits = peekClusterBits(first.subarray(0, n0));
  const cluster = new Uint8Array(2 ** bits);
  const n = await file.read(cluster, 0);
  return parseHeader(cluster.subarray(0, n));
}

/**
 * Walks the metadata of the image and counts the references to each host cluster.
 * `withRefcountStructures`: count the refcount table and blocks too (false for a rebuild).
 */
export async function computeReferences(
  file: Qcow2File,
  h: Qcow2Header,
  withRefcountStructures = true,
): Promise<References> {
  const g = new Geometry(h.clusterBits, (h.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n);
  const cs = g.clusterSize;
  const fileSize = await file.size();
  const nb = Math.ceil(fileSize / cs);
  if (nb > MAX_CHECK_CLUSTERS) {
    throw new Qcow2CorruptError(`image file of ${fileSize} bytes is too large to check`);
  }
  const counts = new Uint32Array(nb);
  const errors: string[] = [];
  const copied: Array<[number, boolean, string]> = [];
  const notChecked: string[] = [];
  const inc = (offset: number, bytes: number, what: string) => {
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + bytes - 1) / cs);
    for (let ci = first; ci <= last; ci++) {
      if (ci >= nb) {
        errors.push(`ERROR ${what} at ${offset} is past the end of the image file`);
        return;
      }
      counts[ci] = counts[ci]! + 1;
    }
  };
  inc(0, cs, 'header');
  // The active L1 table (COPIED flags checked), then those of internal snapshots.
  const walkL1 = async (l1Offset: number, l1Size: number, what: string, active: boolean) => {
    if (l1Size > 0) inc(l1Offset, l1Size * 8, what);
    const l1Buf = await readExact(file, l1Size * 8, l1Offset);
    if (!l1Buf) {
      errors.push(`ERROR ${what} at ${l1Offset} is truncated`);
      return;
    }
    let l1: ReturnType<typeof parseL1>;
    try {
      l1 = parseL1(l1Buf);
    } catch (err) {
      errors.push(`ERROR ${what}: ${(err as Error).message}`);
      return;
    }
    for (let i = 0; i < l1.offsets.length; i++) {
      const l2off = l1.offsets[i]!;
      if (l2off === 0) continue;
      if (l2off % cs !== 0) {
        errors.push(`ERROR ${what} entry ${i}: L2 table offset ${l2off} not cluster aligned`);
        continue;
      }
      inc(l2off, cs, `L2 table of ${what} entry ${i}`);
      if (active) copied.push([l2off / cs, l1.copied[i]!, `L1 entry ${i}`]);
      const l2 = await readExact(file, cs, l2off);
      if (!l2) {
        errors.push(`ERROR L2 table at ${l2off} is past the end of the image file`);
        continue;
      }
      for (let j = 0; j < g.l2Entries; j++) {
        let e: ReturnType<typeof decodeL2>;
        try {
          e = decodeL2(l2, j, g);
        } catch (err) {
          errors.push(`ERROR L2 table ${l2off} entry ${j}: ${(err as Error).message}`);
          continue;
        }
        const guest = (i * g.l2Entries + j) * cs;
        if (e.compressed) {
          inc(e.host - (e.host % 512), e.sectors * 512, `compressed cluster of guest ${guest}`);
        } else if (e.host !== 0) {
          inc(e.host, cs, `data cluster of guest ${guest}`);
          if (active) copied.push([e.host / cs, e.copied, `L2 entry for guest ${guest}`]);
        }
      }
    }
  };
  await walkL1(h.l1TableOffset, h.l1Size, 'L1 table', true);
  if (h.nbSnapshots > 0) {
    // The snapshot table (qcow2.txt "Snapshots"): entries of 40 bytes plus extra data, id
    // and name, each padded to 8 bytes.
    const snaps: Array<{ l1Offset: number; l1Size: number }> = [];
    let off = h.snapshotsOffset;
    let ok = true;
    for (let k = 0; k < h.nbSnapshots && ok; k++) {
      const fixed = await readExact(file, 40, off);
      if (!fixed) {
        errors.push(`ERROR snapshot table entry ${k} at ${off} is truncated`);
        ok = false;
        break;
      }
      const dv = new DataView(fixed.buffer);
      const l1Offset = Number(dv.getBigUint64(0));
      const l1Size = dv.getUint32(8);
      const len = 40 + dv.getUint32(36) + dv.getUint16(12) + dv.getUint16(14);
      if (l1Offset % cs !== 0 || l1Size * 8 > 32 * 1024 * 1024 || !Number.isSafeInteger(l1Offset)) {
        errors.push(`ERROR snapshot ${k}: L1 table ${l1Offset} (${l1Size} entries) invalid`);
      } else snaps.push({ l1Offset, l1Size });
      off += Math.ceil(len / 8) * 8;
    }
    if (ok && off > h.snapshotsOffset)
      inc(h.snapshotsOffset, off - h.snapshotsOffset, 'snapshot table');
    for (const [k, sn] of snaps.entries())
      await walkL1(sn.l1Offset, sn.l1Size, `L1 table of snapshot ${k}`, false);
  }
  if (withRefcountStructures) {
    inc(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
    const rt = await readExact(file, h.refcountTableClusters * cs, h.refcountTableOffset);
    if (!rt) errors.push(`ERROR refcount table at ${h.refcountTableOffset} is truncated`);
    else {
      const dv = new DataView(rt.buffer);
      for (let i = 0; i < rt.length / 8; i++) {
        const v = dv.getBigUint64(i * 8);
        if (v === 0n) continue;
        const off = Number(v);
        if (v > BigInt(Number.MAX_SAFE_INTEGER) || off % cs !== 0) {
          errors.push(`ERROR refcount block ${i} offset ${v} invalid`);
          continue;
        }
        inc(off, cs, `refcount block ${i}`);
      }
    }
  }
  await countBitmapReferences(file, h, inc, errors);
  return { counts, errors, copied, fileSize, notChecked };
}

/** Reads the refcount of every cluster below `nb` from the image's refcount structures. */
export async function readRefcounts(
  file: Qcow2File,
  h: Qcow2Header,
  nb: number,
  errors: string[],
): Promise<Float64Array> {
  const cs = 2 ** h.clusterBits;
  const perBlock = (cs * 8) >> h.refcountOrder;
  const out = new Float64Array(nb);
  const rt = await readExact(file, h.refcountTableClusters * cs, h.refcountTableOffset);
  if (!rt) return out;
  const dv = new DataView(rt.buffer);
  for (let t = 0; t * perBlock < nb && t < rt.length / 8; t++) {
    const v = dv.getBigUint64(t * 8);
    if (v === 0n || v > BigInt(Number.MAX_SAFE_INTEGER) || Number(v) % cs !== 0) continue;
    const block = await readExact(file, cs, Number(v));
    if (!block) {
      errors.push(`ERROR refcount block ${t} at ${v} is past the end of the image file`);
      continue;
    }
    for (let i = 0; i < perBlock && t * perBlock + i < nb; i++) {
      try {
        out[t * perBlock + i] = getRefcount(block, i, h.refcountOrder);
      } catch (err) {
        errors.push(`ERROR cluster ${t * perBlock + i}: ${(err as Error).message}`);
        out[t * perBlock + i] = Number.MAX_SAFE_INTEGER;
      }
    }
  }
  return out;
}

/** Checks an image file (not open for writing elsewhere): refcounts against references. */
export async function checkQcow2(file: Qcow2File): Promise<Qcow2CheckResult> {
  const h = await readHeader(file);
  const refs = await computeReferences(file, h);
  const nb = refs.counts.length;
  const messages = [...refs.errors];
  const onDisk = await readRefcounts(file, h, nb, messages);
  const max = maxRefcount(h.refcountOrder);
  let corruptions = messages.length;
  let leaks = 0;
  let allocated = 0;
  for (let ci = 0; ci < nb; ci++) {
    const want = refs.counts[ci]!;
    const have = onDisk[ci]!;
    if (want > 0) allocated++;
    if (want > max) {
      messages.push(
        `ERROR cluster ${ci} is referenced ${want} times, more than refcount_bits can count`,
      );
      corruptions++;
    } else if (have < want) {
      messages.push(`ERROR cluster ${ci} refcount=${have} reference=${want}`);
      corruptions++;
    } else if (have > want) {
      messages.push(`Leaked cluster ${ci} refcount=${have} reference=${want}`);
      leaks++;
    }
  }
  for (const [ci, flag, what] of refs.copied) {
    const rc = onDisk[ci] ?? 0;
    if (flag !== (rc === 1)) {
      messages.push(`ERROR OFLAG_COPIED ${what}: cluster ${ci} flag=${flag} refcount=${rc}`);
      corruptions++;
    }
  }
  return {
    corruptions,
    leaks,
    messages,
    notChecked: refs.notChecked,
    allocatedClusters: allocated,
    fileSize: refs.fileSize,
  };
}

/**
 * Writes fresh refcount structures (table and blocks, after the end of the file) counting
 * exactly `refs` (computed without the old refcount structures), then points the header at
 * them through `writeHeader` (which must write and flush the header). The old structures
 * become free clusters. Throws REFCOUNT_OVERFLOW when a count does not fit refcount_bits.
 */
export async function rebuildRefcounts(
  file: Qcow2File,
  h: Qcow2Header,
  refs: References,
  writeHeader: () => Promise<void>,
): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const order = h.refcountOrder;
  const perBlock = (cs * 8) >> order;
  const max = maxRefcount(order);
  const a = refs.counts.length;
  for (let ci = 0; ci < a; ci++) {
    if (refs.counts[ci]! > max) throw new RefcountOverflowError(ci, max);
  }
  let b = 1;
  let k = 1;
  for (;;) {
    const t = Math.ceil((a + b + k) / perBlock);
    const nk = Math.ceil((t * 8) / cs);
    if (t === b && nk === k) break;
    b = Math.max(b, t);
    k = Math.max(k, nk);
  }
  const tableBuf = new Uint8Array(k * cs);
  const tdv = new DataView(tableBuf.buffer);
  for (let j = 0; j < b; j++) {
    const block = new Uint8Array(cs);
    for (let i = 0; i < perBlock; i++) {
      const ci = j * perBlock + i;
      const v = ci < a ? refs.counts[ci]! : ci < a + b + k ? 1 : 0;
      if (v) setRefcount(block, i, order, v);
    }
    await file.write(block, (a + j) * cs);
    tdv.setBigUint64(j * 8, BigInt((a + j) * cs));
  }
  await file.write(tableBuf, (a + b) * cs);
  await file.flush();
  h.refcountTableOffset = (a + b) * cs;
  h.refcountTableClusters = k;
  await writeHeader();
}
