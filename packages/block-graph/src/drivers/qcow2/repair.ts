// `qemu-img check` of a qcow2 image file, with its repairs (QEMU's qcow2_check_refcounts
// and check_oflag_copied): refcounts compared with the references (check.ts counts
// them), then the COPIED flags of the active L1 and L2 entries against the refcounts, and
// the fragmentation figures qemu-img prints. Messages are QEMU's, one per problem (qemu-img
// writes them to stderr).
//
// Repairs as QEMU's: with `leaks`, refcounts higher than the references are lowered; with
// `errors`, lower ones are raised, and a refcount of 0 for a referenced cluster (which
// QEMU cannot raise in place) has the refcount structures rebuilt; with either, COPIED
// flags are set or cleared to match the refcounts. The file must not be open elsewhere.

import { computeReferences, readHeader, readRefcounts, rebuildRefcounts } from './check.ts';
import { decodeL2, Geometry } from './cluster-map.ts';
import { Incompat, type Qcow2Header } from './header.ts';
import { setRefcount } from './refcount.ts';
import type { Qcow2File } from './types.ts';

/** QEMU's BdrvCheckResult with its fragmentation info (what qemu-img check reports). */
export interface Qcow2ImageCheck {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export interface Qcow2CheckFix {
  leaks?: boolean;
  errors?: boolean;
}

/** Thrown when the refcount structures need a rebuild that `errors` does not allow. */
export class Qcow2CheckFailed extends Error {
  readonly result: Qcow2ImageCheck;
  constructor(result: Qcow2ImageCheck) {
    super('Input/output error');
    this.result = result;
  }
}

const COPIED = 1n << 63n;
const L1_OFFSET = 0x00fffffffffffe00n;

const hex = (v: bigint): string => v.toString(16);

function emptyResult(): Qcow2ImageCheck {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

async function readAt(file: Qcow2File, length: number, offset: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await file.read(buf, offset);
  return buf;
}

/** Writes refcount `v` for cluster `ci` into its refcount block; false if it has none. */
async function writeRefcount(
  file: Qcow2File,
  h: Qcow2Header,
  ci: number,
  v: number,
): Promise<boolean> {
  const cs = 2 ** h.clusterBits;
  const perBlock = (cs * 8) >> h.refcountOrder;
  const t = Math.floor(ci / perBlock);
  if (t * 8 >= h.refcountTableClusters * cs) return false;
  const entry = new DataView((await readAt(file, 8, h.refcountTableOffset + t * 8)).buffer);
  const block = Number(entry.getBigUint64(0));
  if (block === 0 || block % cs !== 0) return false;
  const buf = await readAt(file, cs, block);
  setRefcount(buf, ci % perBlock, h.refcountOrder, v);
  await file.write(buf, block);
  return true;
}

/** One comparison of refcounts with references (QEMU's compare_refcounts). */
async function compareRefcounts(
  file: Qcow2File,
  h: Qcow2Header,
  counts: Uint32Array,
  onDisk: Float64Array,
  res: Qcow2ImageCheck,
  fix: Qcow2CheckFix,
  say: (line: string) => void,
): Promise<{ rebuild: boolean; highest: number }> {
  let rebuild = false;
  let highest = -1;
  for (let ci = 0; ci < counts.length; ci++) {
    const have = onDisk[ci]!;
    const want = counts[ci]!;
    if (have > 0 || want > 0) highest = ci;
    if (have === want) continue;
    let fixed: 'leaksFixed' | 'corruptionsFixed' | undefined;
    if (have === 0) rebuild = true;
    else if (have > want && fix.leaks) fixed = 'leaksFixed';
    else if (have < want && fix.errors) fixed = 'corruptionsFixed';
    say(
      `${fixed ? 'Repairing' : have < want ? 'ERROR' : 'Leaked'} cluster ${ci} refcount=${have} reference=${want}`,
    );
    if (fixed && (await writeRefcount(file, h, ci, want))) {
      onDisk[ci] = want;
      res[fixed]++;
      continue;
    }
    if (have < want) res.corruptions++;
    else res.leaks++;
  }
  return { rebuild, highest };
}

/**
 * The COPIED flags of the active L1 and L2 entries against the refcounts (repaired when
 * `repair`), and the fragmentation figures of the active tables.
 */
async function checkCopied(
  file: Qcow2File,
  h: Qcow2Header,
  onDisk: Float64Array,
  res: Qcow2ImageCheck,
  repair: boolean,
  say: (line: string) => void,
): Promise<void> {
  const g = new Geometry(h.clusterBits, (h.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n);
  const cs = g.clusterSize;
  const refcount = (offset: number) => onDisk[Math.floor(offset / cs)] ?? 0;
  const l1 = await readAt(file, h.l1Size * 8, h.l1TableOffset);
  const l1v = new DataView(l1.buffer);
  let l1Dirty = false;
  for (let i = 0; i < h.l1Size; i++) {
    const entry = l1v.getBigUint64(i * 8);
    const l2off = Number(entry & L1_OFFSET);
    if (l2off === 0 || l2off % cs !== 0) continue;
    const rc = refcount(l2off);
    if ((rc === 1) !== ((entry & COPIED) !== 0n)) {
      say(
        `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(entry)} refcount=${rc}`,
      );
      if (repair) {
        l1v.setBigUint64(i * 8, rc === 1 ? entry | COPIED : entry & ~COPIED);
        l1Dirty = true;
        res.corruptionsFixed++;
      } else res.corruptions++;
    }
    const l2 = await readAt(file, cs, l2off);
    const l2v = new DataView(l2.buffer);
    let l2Dirty = false;
    let nextContiguous = 0;
    for (let j = 0; j < g.l2Entries; j++) {
      let e: ReturnType<typeof decodeL2>;
      try {
        e = decodeL2(l2, j, g);
      } catch {
        continue; // counted by the references' walk
      }
      if (e.compressed) {
        res.allocatedClusters++;
        res.compressedClusters++;
        res.fragmentedClusters++; // compressed clusters are fragmented by nature (QEMU)
        continue;
      }
      if (e.host === 0) continue;
      res.allocatedClusters++;
      if (nextContiguous !== 0 && e.host !== nextContiguous) res.fragmentedClusters++;
      nextContiguous = e.host + cs;
      const raw = l2v.getBigUint64(j * g.entryBytes);
      const rc = refcount(e.host);
      if ((rc === 1) !== e.copied) {
        say(
          `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex(raw)} refcount=${rc}`,
        );
        if (repair) {
          l2v.setBigUint64(j * g.entryBytes, rc === 1 ? raw | COPIED : raw & ~COPIED);
          l2Dirty = true;
          res.corruptionsFixed++;
        } else res.corruptions++;
      }
    }
    if (l2Dirty) await file.write(l2, l2off);
  }
  if (l1Dirty) await file.write(l1, h.l1TableOffset);
}

/** One check (QEMU's qcow2_check_refcounts), repairing what `fix` allows. */
async function checkOnce(
  file: Qcow2File,
  fix: Qcow2CheckFix,
  say: (line: string) => void,
): Promise<Qcow2ImageCheck> {
  const h = await readHeader(file);
  const res = emptyResult();
  res.totalClusters = Math.ceil(h.size / 2 ** h.clusterBits);
  const refs = await computeReferences(file, h);
  for (const e of refs.errors) say(e);
  const structural = refs.errors.length;
  const errors: string[] = [];
  const onDisk = await readRefcounts(file, h, refs.counts.length, errors);
  for (const e of errors) say(e);
  res.corruptions += structural + errors.length;
  const pre = { ...res };
  // As QEMU: compared once without repairing, then again repairing.
  let { rebuild, highest } = await compareRefcounts(file, h, refs.counts, onDisk, res, {}, say);
  if (rebuild && fix.errors) {
    say('Rebuilding refcount structure');
    const counts = await computeReferences(file, h, false);
    await rebuildRefcounts(file, h, counts, async () => {
      const buf = new Uint8Array(12);
      const dv = new DataView(buf.buffer);
      dv.setBigUint64(0, BigInt(h.refcountTableOffset));
      dv.setUint32(8, h.refcountTableClusters);
      await file.write(buf, 48);
      await file.flush();
    });
    // The rebuilt structures count exactly the references: every mismatch is gone.
    res.corruptionsFixed += res.corruptions - pre.corruptions;
    res.corruptions = pre.corruptions;
    res.leaksFixed += res.leaks;
    res.leaks = 0;
    const again = await computeReferences(file, h);
    const fresh = await readRefcounts(file, h, again.counts.length, []);
    onDisk.set(fresh.subarray(0, onDisk.length));
    const after = emptyResult();
    ({ highest } = await compareRefcounts(
      file,
      h,
      again.counts,
      fresh,
      after,
      { leaks: true },
      say,
    ));
    return finish(file, h, fresh, res, highest, fix, say);
  }
  if (fix.leaks || fix.errors) {
    if (rebuild) {
      say('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new Qcow2CheckFailed(res);
    }
    if (res.leaks || res.corruptions) {
      Object.assign(res, pre);
      ({ highest } = await compareRefcounts(file, h, refs.counts, onDisk, res, fix, say));
    }
  }
  return finish(file, h, onDisk, res, highest, fix, say);
}

async function finish(
  file: Qcow2File,
  h: Qcow2Header,
  onDisk: Float64Array,
  res: Qcow2ImageCheck,
  highest: number,
  fix: Qcow2CheckFix,
  say: (line: string) => void,
): Promise<Qcow2ImageCheck> {
  await checkCopied(file, h, onDisk, res, !!(fix.leaks || fix.errors), say);
  res.imageEndOffset = (highest + 1) * 2 ** h.clusterBits;
  if (res.leaksFixed || res.corruptionsFixed) await file.flush();
  return res;
}

/**
 * Checks (and with `fix` repairs) a qcow2 image file as `qemu-img check [-r leaks|all]`
 * does in one pass; after repairs qemu-img checks again (without `fix`) and reports that
 * second result with the repairs of the first. `say` gets QEMU's message for each problem.
 * Throws Qcow2CheckFailed when the refcount structures need a rebuild `fix` does not allow.
 */
export async function checkQcow2Image(
  file: Qcow2File,
  fix: Qcow2CheckFix = {},
  say: (line: string) => void = () => {},
): Promise<Qcow2ImageCheck> {
  if (!fix.leaks && !fix.errors) return checkOnce(file, fix, say);
  let consistent = false;
  try {
    const res = await checkOnce(file, fix, say);
    consistent = !res.checkErrors && !res.corruptions;
    return res;
  } finally {
    await markClean(file, consistent);
  }
}

/**
 * After a repair, as qemu-img leaves the image it opened for writing: the dirty bit
 * cleared (qcow2_mark_clean, which its close does whatever the check found), the corrupt
 * bit too when nothing is left wrong (qcow2_mark_consistent).
 */
async function markClean(file: Qcow2File, consistent: boolean): Promise<void> {
  const h = await readHeader(file);
  const marks = consistent ? Incompat.DIRTY | Incompat.CORRUPT : Incompat.DIRTY;
  if (h.version < 3 || !(h.incompatibleFeatures & marks)) return;
  const buf = new Uint8Array(8);
  new DataView(buf.buffer).setBigUint64(0, h.incompatibleFeatures & ~marks);
  await file.write(buf, 72);
  await file.flush();
}
