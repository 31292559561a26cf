// Allocation (the allocating half of QEMU's qcow2-cluster.c): map('write') answers, copy on
// write of shared or compressed clusters, fresh clusters for a write, and linking them in
// the L2 table once their data is written (commit) or returning them (abort). write() is
// the same map -> data -> commit loop the graph's generic layer runs.
//
// Crash safety: refcounts are raised before map returns (never linked: a crash leaks them);
// the L2 entry is set only after the data is written.

import { encodeL2, type L2Entry } from './cluster-map.ts';
import type { CacheEntry } from './l2-cache.ts';
import {
  entryAt,
  getL2,
  getOrCreateL2,
  inPlace,
  readBelow,
  readCurrent,
  touchedMask,
} from './mapping.ts';
import { allocData, checkDataHost, isMetadata } from './overlap.ts';
import {
  beforeMetadataChange,
  checkWritable,
  enter,
  freeLater,
  leave,
  markCorrupt,
  type Qcow2State,
} from './state.ts';
import { ioBuffer, type Qcow2WriteMapping, releaseIoBuffer } from './types.ts';

/**
 * Writes `buf` at guest `offset` as the graph does: map, write the data (with the rest of
 * a new allocation unit filled by copy on write), then commit, or abort on failure.
 * Precondition: the range is within the disk.
 */
export async function write(s: Qcow2State, buf: Uint8Array, offset: number): Promise<void> {
  checkWritable(s);
  const end = offset + buf.length;
  for (let pos = offset; pos < end; ) {
    const m =
      mapWriteCached(s, pos, end - pos) ??
      mapWriteAllocCached(s, pos, end - pos) ??
      (await mapWrite(s, pos, end - pos));
    await writeMapped(s, m, buf.subarray(pos - offset, pos - offset + m.length), pos);
    pos += m.length;
  }
}

/** The data write of one mapping, then its commit (abort if the data write failed). */
async function writeMapped(
  s: Qcow2State,
  m: Qcow2WriteMapping,
  data: Uint8Array,
  offset: number,
): Promise<void> {
  const a = m.allocation;
  let unit = data;
  try {
    if (a.start < offset || a.end > offset + data.length) {
      unit = ioBuffer(s.file, a.end - a.start);
      const head = unit.subarray(0, offset - a.start);
      const tail = unit.subarray(offset - a.start + data.length);
      if (a.from === 'below') {
        await readBelow(s, head, a.start);
        await readBelow(s, tail, offset + data.length);
      }
      unit.set(data, offset - a.start);
    }
    await s.file.write(unit, m.host - (offset - a.start));
  } catch (err) {
    await a.abort(err);
    throw err;
  } finally {
    if (unit !== data) releaseIoBuffer(s.file, unit);
  }
  await a.commit();
}

/**
 * mapWrite answered synchronously when the range starts in clusters that are written in
 * place (L2 table cached, allocated, refcount one); null otherwise (then use mapWrite).
 * Precondition as mapWrite.
 */
export function mapWriteCached(
  s: Qcow2State,
  offset: number,
  length: number,
): Qcow2WriteMapping | null {
  if (s.closed || s.readOnly || s.corrupt) return null;
  const g = s.geom;
  const l1i = Math.floor(offset / g.l2Span);
  const l2off = s.l1[l1i] ?? 0;
  const l2 = l2off === 0 ? null : s.l2Cache.peek(l2off);
  if (!l2) return null;
  const end = Math.min(offset + length, (l1i + 1) * g.l2Span);
  let run: InPlaceRun | null;
  try {
    run = scanInPlace(s, l2, offset, end);
  } catch {
    return null;
  }
  // A run over metadata: the asynchronous path reports it.
  if (!run || run.overMetadata) return null;
  const gen = enter(s);
  const done = async () => leave(s, gen);
  return {
    length: run.length,
    host: run.host,
    allocation: {
      start: offset,
      end: offset + run.length,
      from: 'zero',
      commit: done,
      abort: done,
    },
  };
}

/**
 * mapWrite's allocation of fresh clusters answered synchronously (standard L2 entries):
 * when the range starts in an unallocated cluster whose L2 table is cached and ours, its
 * lock free and the refcounts to search cached. The same clusters, locks and commit as
 * mapWrite would take; null otherwise (then use mapWrite). Precondition as mapWrite.
 */
export function mapWriteAllocCached(
  s: Qcow2State,
  offset: number,
  length: number,
): Qcow2WriteMapping | null {
  const gm = s.geom;
  if (s.closed || s.readOnly || s.corrupt || gm.extendedL2) return null;
  // The header's dirty flag is written first (beforeMetadataChange): not without waiting.
  if (s.lazyRefcounts && !s.dirtyMarked) return null;
  const cs = gm.clusterSize;
  const l1i = Math.floor(offset / gm.l2Span);
  const l2off = s.l1[l1i] ?? 0;
  if (l2off === 0 || !s.l1Copied[l1i]) return null;
  const l2 = s.l2Cache.peek(l2off);
  if (!l2) return null;
  const end = Math.min(offset + length, (l1i + 1) * gm.l2Span);
  const c0 = Math.floor(offset / cs);
  const e = entryAt(s, l2, c0);
  if (e.compressed || e.host !== 0) return null;
  // The same run as mapWriteLocked's, at most 32 clusters.
  const cLast = Math.min(Math.floor((end - 1) / cs), c0 + 31);
  const cBase = c0 * cs;
  const { last, src } = freshRun(s, l2, e, c0, cLast, offset !== cBase, end);
  const n = last - c0 + 1;
  const free = s.refcounts.findFreeCached(n);
  if (free === undefined) return null;
  // Over metadata (wrong refcounts): mapWrite finds the same clusters and reports it.
  for (let k = 0; k < n; k++) if (isMetadata(s, (free + k) * cs)) return null;
  // A held cluster lock: an allocation of that cluster is in flight; wait for it there.
  const locked: number[] = [];
  for (let ci = c0; ci <= last; ci++) {
    if (!s.clusterLocks.tryLock(ci)) {
      s.clusterLocks.unlockAll(locked);
      return null;
    }
    locked.push(ci);
  }
  const hostStart = s.refcounts.takeRun(free, n);
  const gen = enter(s);
  s.l2Cache.getCached(l2off); // the pin freshAllocation takes over
  const unitEnd = (last + 1) * cs;
  return {
    length: Math.min(end, unitEnd) - offset,
    host: hostStart + (offset - cBase),
    allocation: freshAllocation(s, l2, c0, n, hostStart, src, gen, locked),
  };
}

/** Where the rest of a fresh standard cluster comes from. */
function freshSource(s: Qcow2State, x: L2Entry): 'below' | 'zero' {
  return (x.zero & 1) !== 0 || !s.backing ? 'zero' : 'below';
}

/**
 * The fresh standard clusters one allocation takes from c0 (its entry `e`, unallocated):
 * the first, then following ones the write (ending at `end`) covers whole, or the last
 * partly when it fills from the same source as the first (`headFill`: the first is
 * partly written); up to cLast. The last cluster taken and where unwritten bytes come from.
 */
function freshRun(
  s: Qcow2State,
  l2: CacheEntry,
  e: L2Entry,
  c0: number,
  cLast: number,
  headFill: boolean,
  end: number,
): { last: number; src: 'below' | 'zero' } {
  const cs = s.geom.clusterSize;
  const headSrc = freshSource(s, e);
  let src = headSrc;
  let last = c0;
  if (end < (c0 + 1) * cs) return { last, src };
  for (let ci = c0 + 1; ci <= cLast; ci++) {
    const x = entryAt(s, l2, ci);
    if (x.compressed || x.host !== 0) break;
    if (end >= (ci + 1) * cs) {
      last = ci;
      continue;
    }
    const tailSrc = freshSource(s, x);
    if (!headFill || tailSrc === headSrc) {
      last = ci;
      src = tailSrc;
    }
    break;
  }
  return { last, src };
}

/** The L2 entry of a whole cluster once its data is written. */
function linkWhole(x: L2Entry, host: number): L2Entry {
  return { ...x, host, copied: true, alloc: 1, zero: 0 };
}

interface AllocEntry {
  ci: number;
  e: L2Entry;
  host: number;
  fresh: boolean;
}

/**
 * Maps a guest write (see Qcow2WriteMapping), allocating where needed; compressed or
 * shared clusters are first copied into a cluster of their own. The answer covers at
 * least one byte; the caller asks again for the rest. Precondition: within the disk,
 * length > 0, image writable.
 */
export async function mapWrite(
  s: Qcow2State,
  offset: number,
  length: number,
): Promise<Qcow2WriteMapping> {
  checkWritable(s);
  const gen = enter(s);
  let handedOff = false;
  try {
    const m = await mapWriteLocked(s, offset, length, gen);
    handedOff = true;
    return m;
  } finally {
    if (!handedOff) leave(s, gen);
  }
}

async function mapWriteLocked(
  s: Qcow2State,
  offset: number,
  length: number,
  gen: number,
): Promise<Qcow2WriteMapping> {
  const gm = s.geom;
  const cs = gm.clusterSize;
  const l1i = Math.floor(offset / gm.l2Span);
  const end = Math.min(offset + length, (l1i + 1) * gm.l2Span);
  const c0 = Math.floor(offset / cs);
  const inPlace = (host: number, len: number): Qcow2WriteMapping => ({
    length: len,
    host,
    allocation: {
      start: offset,
      end: offset + len,
      from: 'zero',
      commit: async () => leave(s, gen),
      abort: async () => leave(s, gen),
    },
  });
  // In place without locks: a run of allocated clusters, contiguous in the file.
  const fast = await inPlaceRun(s, l1i, offset, end);
  if (fast) {
    await checkDataHost(s, fast.host, fast.length);
    return inPlace(fast.host, fast.length);
  }
  // Lock the clusters this mapping may cover (at most 32), then look again.
  const cLast = Math.min(Math.floor((end - 1) / cs), c0 + 31);
  const keys: number[] = [];
  for (let ci = c0; ci <= cLast; ci++) keys.push(ci);
  await s.clusterLocks.lockAll(keys);
  let locked = keys;
  const unlock = (ks: number[]) => s.clusterLocks.unlockAll(ks);
  let l2: CacheEntry | null = null;
  try {
    await beforeMetadataChange(s);
    l2 = await getOrCreateL2(s, l1i);
    let e = entryAt(s, l2, c0);
    if (e.compressed || (e.host !== 0 && !e.copied)) {
      e = await makePrivate(s, l2, c0, e);
    }
    const again = await inPlaceRun(s, l1i, offset, end);
    if (again) {
      await checkDataHost(s, again.host, again.length);
      s.l2Cache.unpin(l2);
      l2 = null;
      unlock(locked);
      locked = [];
      return inPlace(again.host, again.length);
    }
    const cBase = c0 * cs;
    const from = offset - cBase;
    const sourceOf = (x: L2Entry, sub: number): 'below' | 'zero' =>
      (x.zero & (2 ** sub)) !== 0 || !s.backing ? 'zero' : 'below';
    let start: number;
    let unitEnd: number;
    let src: 'below' | 'zero';
    let hostStart: number;
    let entries: AllocEntry[];
    if (gm.extendedL2) {
      // One cluster; the unit is the span of touched subclusters, minus allocated edges.
      const sc = gm.subclusterSize;
      const to = Math.min(end, cBase + cs) - cBase;
      const a = Math.floor(from / sc);
      let b = Math.ceil(to / sc);
      const headPartial = from % sc !== 0 && (e.alloc & (2 ** a)) === 0;
      let tailPartial = to % sc !== 0 && (e.alloc & (2 ** (b - 1))) === 0;
      let wEnd = to;
      if (headPartial && tailPartial && b - 1 !== a && sourceOf(e, a) !== sourceOf(e, b - 1)) {
        // Different sources at both ends: stop at the end of the head subcluster.
        wEnd = (a + 1) * sc;
        b = a + 1;
        tailPartial = false;
      }
      src = headPartial ? sourceOf(e, a) : tailPartial ? sourceOf(e, b - 1) : 'zero';
      start = cBase + (headPartial ? a * sc : from);
      unitEnd = cBase + (tailPartial ? b * sc : wEnd);
      const fresh = e.host === 0;
      const host = fresh ? 0 : e.host;
      entries = [{ ci: c0, e, host, fresh }];
      hostStart = host;
      locked = keepLocked(s, locked, c0);
      if (fresh) {
        hostStart = await allocData(s, 1);
        entries[0]!.host = hostStart;
      }
      const touched = touchedMask(s, start - cBase, unitEnd - cBase);
      const mapping: Qcow2WriteMapping = {
        length: Math.min(end, unitEnd) - offset,
        host: hostStart + (offset - cBase),
        allocation: allocationFor(s, l2, entries, start, unitEnd, src, gen, locked, (x, host) => ({
          ...x,
          host,
          copied: true,
          alloc: (x.alloc | touched) >>> 0,
          zero: (x.zero & ~touched) >>> 0,
        })),
      };
      l2 = null;
      locked = [];
      return mapping;
    }
    // Standard L2: whole clusters. A zero cluster keeping its host is rewritten in place.
    if (e.host !== 0) {
      locked = keepLocked(s, locked, c0);
      entries = [{ ci: c0, e, host: e.host, fresh: false }];
      const mapping: Qcow2WriteMapping = {
        length: Math.min(end, cBase + cs) - offset,
        host: e.host + from,
        allocation: allocationFor(
          s,
          l2,
          entries,
          cBase,
          cBase + cs,
          'zero',
          gen,
          locked,
          linkWhole,
        ),
      };
      await checkDataHost(s, e.host, cs);
      l2 = null;
      locked = [];
      return mapping;
    }
    // Fresh clusters: the run freshRun takes.
    const run = freshRun(s, l2, e, c0, cLast, from !== 0, end);
    const n = run.last - c0 + 1;
    locked = keepLocked(s, locked, run.last);
    hostStart = await allocData(s, n);
    const unitEndStd = (run.last + 1) * cs;
    const mapping: Qcow2WriteMapping = {
      length: Math.min(end, unitEndStd) - offset,
      host: hostStart + from,
      allocation: freshAllocation(s, l2, c0, n, hostStart, run.src, gen, locked),
    };
    l2 = null;
    locked = [];
    return mapping;
  } finally {
    if (l2) s.l2Cache.unpin(l2);
    if (locked.length) unlock(locked);
  }
}

/** Unlocks the keys after `last` and returns the ones kept. */
function keepLocked(s: Qcow2State, keys: number[], last: number): number[] {
  const keep = keys.filter((k) => k <= last);
  s.clusterLocks.unlockAll(keys.filter((k) => k > last));
  return keep;
}

/** A run of in-place writable clusters from `offset`, contiguous in the file; null if none. */
async function inPlaceRun(
  s: Qcow2State,
  l1i: number,
  offset: number,
  end: number,
): Promise<{ host: number; length: number } | null> {
  const l2 = await getL2(s, l1i);
  if (!l2) return null;
  try {
    return scanInPlace(s, l2, offset, end);
  } finally {
    s.l2Cache.unpin(l2);
  }
}

interface InPlaceRun {
  host: number;
  length: number;
  /** A cluster of the run holds metadata (a corrupt image). */
  overMetadata: boolean;
}

/**
 * The clusters from `offset` (before `end`, within one L2 table) written in place and
 * contiguous in the file; null when the first is not. Throws on a corrupt entry.
 */
function scanInPlace(
  s: Qcow2State,
  l2: CacheEntry,
  offset: number,
  end: number,
): InPlaceRun | null {
  const cs = s.clusterSize;
  let host = -1;
  let pos = offset;
  let overMetadata = false;
  while (pos < end) {
    const ci = Math.floor(pos / cs);
    const e = entryAt(s, l2, ci);
    const from = pos - ci * cs;
    const to = Math.min(end, (ci + 1) * cs) - ci * cs;
    if (!inPlace(s, e, from, to)) break;
    if (host >= 0 && e.host + from !== host + (pos - offset)) break;
    if (isMetadata(s, e.host)) overMetadata = true;
    if (host < 0) host = e.host + from;
    pos = ci * cs + to;
  }
  return pos > offset ? { host, length: pos - offset, overMetadata } : null;
}

/** Copies a compressed or shared cluster into a cluster of its own and links it. */
async function makePrivate(
  s: Qcow2State,
  l2: CacheEntry,
  ci: number,
  e: L2Entry,
): Promise<L2Entry> {
  const cs = s.clusterSize;
  if (!e.compressed) {
    const rc = await s.refcounts.get(e.host / cs);
    if (rc === 0) await markCorrupt(s, `data cluster ${e.host} in use but has refcount 0`);
    if (rc === 1) {
      const ne = { ...e, copied: true };
      encodeL2(l2.data, ci % s.geom.l2Entries, ne, s.geom);
      s.l2Cache.markDirty(l2);
      return ne;
    }
  }
  const buf = ioBuffer(s.file, cs);
  let host: number;
  try {
    await readCurrent(s, buf, e, ci, 0);
    host = await allocData(s, 1);
    await s.file.write(buf, host);
  } finally {
    releaseIoBuffer(s.file, buf);
  }
  const ne: L2Entry = {
    compressed: false,
    host,
    copied: true,
    alloc: s.geom.fullMask,
    zero: 0,
    sectors: 0,
  };
  encodeL2(l2.data, ci % s.geom.l2Entries, ne, s.geom);
  s.l2Cache.markDirty(l2);
  if (e.compressed) freeLater(s, e.host - (e.host % 512), e.sectors * 512);
  else freeLater(s, e.host, cs);
  return ne;
}

/** allocationFor of `n` fresh standard clusters from guest cluster `c0` at `hostStart`,
 * linked whole (as linkWhole), without an object per cluster: a 1 MiB write links 16. */
function freshAllocation(
  s: Qcow2State,
  l2: CacheEntry,
  c0: number,
  n: number,
  hostStart: number,
  from: 'below' | 'zero',
  gen: number,
  locked: number[],
): Qcow2WriteMapping['allocation'] {
  const cs = s.clusterSize;
  const link = () => {
    // One entry for the run (linkWhole of a fresh cluster), its host set per cluster.
    const e: L2Entry = { compressed: false, host: 0, copied: true, alloc: 1, zero: 0, sectors: 0 };
    for (let k = 0; k < n; k++) {
      e.host = hostStart + k * cs;
      encodeL2(l2.data, (c0 + k) % s.geom.l2Entries, e, s.geom);
    }
  };
  // Never linked anywhere: the clusters can be returned at once.
  const unlink = () => s.refcounts.update(hostStart, n * cs, -1);
  return settleOnce(s, l2, gen, locked, c0 * cs, (c0 + n) * cs, from, link, unlink);
}

/** The commit/abort pair of an allocation; takes over the L2 pin and the locks. */
function allocationFor(
  s: Qcow2State,
  l2: CacheEntry,
  entries: AllocEntry[],
  start: number,
  end: number,
  from: 'below' | 'zero',
  gen: number,
  locked: number[],
  update: (e: L2Entry, host: number) => L2Entry,
): Qcow2WriteMapping['allocation'] {
  const link = () => {
    for (const x of entries) {
      encodeL2(l2.data, x.ci % s.geom.l2Entries, update(x.e, x.host), s.geom);
    }
  };
  const unlink = async () => {
    // Never linked anywhere: the clusters can be returned at once.
    for (const x of entries) if (x.fresh) await s.refcounts.update(x.host, s.clusterSize, -1);
  };
  return settleOnce(s, l2, gen, locked, start, end, from, link, unlink);
}

/**
 * An allocation's commit (`link` its L2 entries, synchronously: no async frame per
 * allocation, a settled promise) or abort (`unlink` what it took), whichever comes first,
 * once; either releases the L2 pin, the cluster locks and the request generation.
 */
function settleOnce(
  s: Qcow2State,
  l2: CacheEntry,
  gen: number,
  locked: number[],
  start: number,
  end: number,
  from: 'below' | 'zero',
  link: () => void,
  unlink: () => Promise<void>,
): Qcow2WriteMapping['allocation'] {
  let settled = false;
  const finish = () => {
    settled = true;
    s.l2Cache.unpin(l2);
    s.clusterLocks.unlockAll(locked);
    leave(s, gen);
  };
  return {
    start,
    end,
    from,
    commit: () => {
      if (settled) return Promise.resolve();
      try {
        link();
        s.l2Cache.markDirty(l2);
      } catch (err) {
        return Promise.reject(err);
      } finally {
        finish();
      }
      return Promise.resolve();
    },
    abort: async () => {
      if (settled) return;
      try {
        await unlink();
      } finally {
        finish();
      }
    },
  };
}
