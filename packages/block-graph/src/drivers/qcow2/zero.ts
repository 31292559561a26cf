// Write zeroes and discard (QEMU's qcow2_cluster_zeroize / qcow2_cluster_discard): zero
// clusters or deallocation for whole clusters, zero subclusters with extended L2, data
// writes for the partial rest. Freed clusters go back to the refcounts once the L2 change
// is on disk (flush.ts).

import { write } from './allocation.ts';
import { encodeL2, type L2Entry, UNALLOCATED } from './cluster-map.ts';
import { flushMetadata } from './flush.ts';
import { entryAt, getL2, getOrCreateL2, touchedMask } from './mapping.ts';
import {
  beforeMetadataChange,
  checkWritable,
  enter,
  freeLater,
  leave,
  MiB,
  type Qcow2State,
} from './state.ts';

/**
 * Makes [offset, offset + length) read as zeros: zero clusters (v3) or deallocation (v2
 * without backing) for whole clusters, zero subclusters with extended L2, data for the rest.
 * With `mayUnmap` the host clusters of whole zeroed clusters are freed, otherwise kept
 * (preallocated). Precondition: within the disk.
 */
export async function writeZeroes(
  s: Qcow2State,
  offset: number,
  length: number,
  opts: { mayUnmap?: boolean } = {},
): Promise<void> {
  checkWritable(s);
  if (s.header.version < 3 && s.backing) {
    // v2 cannot mark zeros over a backing file: write them.
    const chunk = new Uint8Array(Math.min(length, 4 * MiB));
    for (let p = offset; p < offset + length; p += chunk.length) {
      await write(s, chunk.subarray(0, Math.min(chunk.length, offset + length - p)), p);
    }
    return;
  }
  await zeroOrDiscard(s, offset, length, opts.mayUnmap ?? false, false);
}

/**
 * Discards [offset, offset + length): whole clusters in it are freed (their refcount
 * drops once the change is on disk; the file gets the discard too) and read as zeros
 * afterwards, except on v2 images over a backing file, where they read from it again.
 * With extended L2, whole subclusters of the other clusters read as zeros (their host
 * cluster stays). The rest is left unchanged (discard is advisory). Precondition: within
 * the disk.
 */
export async function discard(s: Qcow2State, offset: number, length: number): Promise<void> {
  checkWritable(s);
  await zeroOrDiscard(s, offset, length, true, true);
}

/**
 * Empties the image (QEMU qcow2_make_empty, as qemu-img commit leaves the committed
 * image): every cluster deallocated, reading from the backing file again, flushed.
 */
export async function makeEmpty(s: Qcow2State): Promise<void> {
  checkWritable(s);
  const size = s.header.size;
  for (let pos = 0; pos < size; pos += s.geom.l2Span) {
    await zeroOrDiscard(s, pos, Math.min(s.geom.l2Span, size - pos), true, true, true);
  }
  await flushMetadata(s);
}

async function zeroOrDiscard(
  s: Qcow2State,
  offset: number,
  length: number,
  unmap: boolean,
  discard: boolean,
  full = false,
): Promise<void> {
  const g = enter(s);
  const partial: Array<[number, number]> = [];
  try {
    const gm = s.geom;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const l1i = Math.floor(pos / gm.l2Span);
      const chunkEnd = Math.min(end, (l1i + 1) * gm.l2Span);
      await zeroChunk(s, pos, chunkEnd, l1i, unmap, discard, partial, full);
      pos = chunkEnd;
    }
  } finally {
    leave(s, g);
  }
  for (const [from, to] of partial) await write(s, new Uint8Array(to - from), from);
  const batch = s.options.discardBatch ?? 1024;
  if (s.pendingFrees.length >= batch) await flushMetadata(s);
}

async function zeroChunk(
  s: Qcow2State,
  start: number,
  end: number,
  l1i: number,
  unmap: boolean,
  discard: boolean,
  partial: Array<[number, number]>,
  full = false,
): Promise<void> {
  const g = s.geom;
  const cs = g.clusterSize;
  const sc = g.subclusterSize;
  const v3 = s.header.version >= 3;
  const hasBacking = s.backing !== null;
  const c0 = Math.floor(start / cs);
  const c1 = Math.floor((end - 1) / cs);
  const keys: number[] = [];
  for (let ci = c0; ci <= c1; ci++) keys.push(ci);
  await s.clusterLocks.lockAll(keys);
  try {
    const existing = await getL2(s, l1i);
    // No L2 table: reads as zeros without a backing file, and a full discard has nothing to drop.
    if (!existing && (!hasBacking || full)) return;
    if (existing) s.l2Cache.unpin(existing);
    await beforeMetadataChange(s);
    const l2 = await getOrCreateL2(s, l1i);
    try {
      let changed = false;
      for (let ci = c0; ci <= c1; ci++) {
        const e = entryAt(s, l2, ci);
        const from = Math.max(start, ci * cs) - ci * cs;
        const to = Math.min(end, (ci + 1) * cs) - ci * cs;
        // Subclusters fully inside [from, to).
        const a = Math.ceil(from / sc);
        const b = Math.floor(to / sc);
        if (b <= a) {
          if (!discard && !readsZero(s, e, from, to)) partial.push([ci * cs + from, ci * cs + to]);
          continue;
        }
        if (!discard) {
          if (from < a * sc && !readsZero(s, e, from, a * sc))
            partial.push([ci * cs + from, ci * cs + a * sc]);
          if (b * sc < to && !readsZero(s, e, b * sc, to))
            partial.push([ci * cs + b * sc, ci * cs + to]);
        }
        const whole = a === 0 && b === g.subclusters;
        if (!g.extendedL2 && !whole) continue;
        let mask = 0;
        for (let i = a; i < b; i++) mask = (mask | (2 ** i)) >>> 0;
        // A full discard (make empty) leaves nothing, not even zero flags.
        const makeZero = discard ? hasBacking && v3 && !full : v3;
        let ne: L2Entry;
        if (!whole) {
          // Extended L2, whole subclusters of a cluster.
          if (e.compressed || (e.host !== 0 && !e.copied)) {
            if (!discard) partial.push([ci * cs + a * sc, ci * cs + b * sc]);
            continue;
          }
          ne = {
            ...e,
            alloc: (e.alloc & ~mask) >>> 0,
            zero: makeZero ? (e.zero | mask) >>> 0 : (e.zero & ~mask) >>> 0,
          };
        } else if (!discard && !unmap && v3 && !e.compressed && e.host !== 0 && e.copied) {
          // Zero cluster keeping its host cluster (preallocated).
          ne = { ...e, alloc: 0, zero: g.fullMask };
        } else {
          if (e.compressed) freeLater(s, e.host - (e.host % 512), e.sectors * 512);
          else if (e.host !== 0) freeLater(s, e.host, cs, true);
          ne = { ...UNALLOCATED, zero: makeZero ? g.fullMask : 0 };
        }
        encodeL2(l2.data, ci % g.l2Entries, ne, g);
        changed = true;
      }
      if (changed) s.l2Cache.markDirty(l2);
    } finally {
      s.l2Cache.unpin(l2);
    }
  } finally {
    s.clusterLocks.unlockAll(keys);
  }
}

/** Whether [from, to) of a cluster with entry `e` reads as zeros without touching data. */
function readsZero(s: Qcow2State, e: L2Entry, from: number, to: number): boolean {
  if (e.compressed) return false;
  const m = touchedMask(s, from, to);
  if ((e.alloc & m) !== 0) return false;
  return s.backing === null || (e.zero & m) >>> 0 === m;
}
