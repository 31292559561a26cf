// Cluster mapping (the lookup half of QEMU's qcow2-cluster.c): L2 tables through the cache,
// the segments a guest range maps to (data, zero, backing, compressed), reads and block
// status, and the map('read') answers of the graph adapter.

import { Qcow2CorruptError } from '../../errors.ts';
import { decodeL2, type L2Entry, UNALLOCATED } from './cluster-map.ts';
import { decompressCluster } from './compress.ts';
import type { CacheEntry } from './l2-cache.ts';
import { isMetadata } from './overlap.ts';
import { enter, freeLater, leave, markCorrupt, type Qcow2State } from './state.ts';
import type { Qcow2Extent, Qcow2ReadMapping } from './types.ts';

// Zero and backing segments of an allocated cluster (QEMU's ZERO_ALLOC and UNALLOCATED_ALLOC)
// keep its host offset: block status reports it (OFFSET_VALID) as QEMU's does.
export type Segment =
  | { kind: 'data'; guest: number; length: number; host: number }
  | { kind: 'zero'; guest: number; length: number; host?: number }
  | { kind: 'backing'; guest: number; length: number; host?: number }
  | { kind: 'compressed'; guest: number; length: number; entry: L2Entry; within: number };

/** What mapRead answers for the first segment of a range. */
function readMappingOf(seg: Segment): Qcow2ReadMapping {
  switch (seg.kind) {
    case 'data':
      return { length: seg.length, kind: 'data', host: seg.host };
    case 'zero':
      return {
        length: seg.length,
        kind: 'zero',
        ...(seg.host !== undefined && { host: seg.host }),
      };
    case 'backing':
      return {
        length: seg.length,
        kind: 'unallocated',
        ...(seg.host !== undefined && { host: seg.host }),
      };
    default:
      return { length: seg.length, kind: 'compressed' };
  }
}

/** The L2 table of L1 index `i`, pinned; null when there is none. */
export async function getL2(s: Qcow2State, i: number): Promise<CacheEntry | null> {
  const off = s.l1[i] ?? 0;
  if (off === 0) return null;
  if (
    off < s.clusterSize ||
    s.refcounts.isRefcountMetadata(off) ||
    (off >= s.header.l1TableOffset && off < s.header.l1TableOffset + s.header.l1Size * 8)
  ) {
    throw new Qcow2CorruptError(`L2 table ${i} at ${off} overlaps other metadata`);
  }
  return s.l2Cache.get(off);
}

/**
 * The L2 table of L1 index `i`, created if missing, pinned, and ours alone: a table an
 * internal snapshot shares (refcount > 1, COPIED clear in L1) is first copied into a new
 * cluster (QEMU's l2_allocate copying the old table). Caller holds the cluster locks.
 */
export async function getOrCreateL2(s: Qcow2State, i: number): Promise<CacheEntry> {
  const have = await getL2(s, i);
  if (have && s.l1Copied[i]) return have;
  if (have) s.l2Cache.unpin(have);
  await s.l2Locks.lock(i);
  try {
    const again = await getL2(s, i);
    if (again && s.l1Copied[i]) return again;
    if (again) {
      const old = s.l1[i]!;
      const rc = await s.refcounts.get(old / s.clusterSize);
      if (rc === 1) {
        s.l1Copied[i] = true;
        s.l1Dirty.add(i);
        return again;
      }
      try {
        return await copyL2(s, i, again);
      } finally {
        s.l2Cache.unpin(again);
      }
    }
    const off = await s.refcounts.allocate(1);
    if (isMetadata(s, off)) await markCorrupt(s, `new L2 table at ${off} overlaps metadata`);
    const e = await s.l2Cache.create(off);
    s.l2Offsets.add(off);
    s.l1[i] = off;
    s.l1Copied[i] = true;
    s.l1Dirty.add(i);
    return e;
  } finally {
    s.l2Locks.unlock(i);
  }
}

/**
 * Copies the shared L2 table of L1 index `i` into a cluster of its own and points L1 at
 * it; the entries keep their COPIED flags (clear: the data clusters stay shared). The old
 * table loses this reference once the new L1 entry is on disk (freeLater).
 */
async function copyL2(s: Qcow2State, i: number, shared: CacheEntry): Promise<CacheEntry> {
  const old = s.l1[i]!;
  const off = await s.refcounts.allocate(1);
  if (isMetadata(s, off)) await markCorrupt(s, `new L2 table at ${off} overlaps metadata`);
  const e = await s.l2Cache.create(off, shared.data);
  s.l2Offsets.add(off);
  s.l1[i] = off;
  s.l1Copied[i] = true;
  s.l1Dirty.add(i);
  freeLater(s, old, s.clusterSize);
  return e;
}

export function entryAt(s: Qcow2State, l2: CacheEntry | null, ci: number): L2Entry {
  if (!l2) return UNALLOCATED;
  return decodeL2(l2.data, ci % s.geom.l2Entries, s.geom);
}

/** Segments describing guest range [offset, offset+length) within one cluster. */
function segmentsOf(
  s: Qcow2State,
  e: L2Entry,
  ci: number,
  from: number,
  to: number,
  out: Segment[],
): void {
  const g = s.geom;
  const base = ci * g.clusterSize;
  if (e.compressed) {
    out.push({
      kind: 'compressed',
      guest: base + from,
      length: to - from,
      entry: e,
      within: from,
    });
    return;
  }
  let pos = from;
  while (pos < to) {
    const sc = Math.floor(pos / g.subclusterSize);
    const end = Math.min(to, (sc + 1) * g.subclusterSize);
    const bit = 2 ** sc;
    const host = e.host !== 0 ? { host: e.host + pos } : {};
    const seg: Segment =
      (e.alloc & bit) !== 0
        ? { kind: 'data', guest: base + pos, length: end - pos, host: e.host + pos }
        : (e.zero & bit) !== 0
          ? { kind: 'zero', guest: base + pos, length: end - pos, ...host }
          : { kind: 'backing', guest: base + pos, length: end - pos, ...host };
    const last = out[out.length - 1];
    if (
      last &&
      last.kind === seg.kind &&
      last.guest + last.length === seg.guest &&
      (last.host === undefined
        ? seg.host === undefined
        : seg.host !== undefined && last.host + last.length === seg.host)
    ) {
      last.length += seg.length;
    } else out.push(seg);
    pos = end;
  }
}

/** Segments of [offset, offset + length); with `firstOnly`, stops once the first is complete. */
async function mapRange(
  s: Qcow2State,
  offset: number,
  length: number,
  firstOnly = false,
): Promise<Segment[]> {
  const g = s.geom;
  const out: Segment[] = [];
  let pos = offset;
  const end = offset + length;
  while (pos < end && !(firstOnly && out.length > 1)) {
    const l1i = Math.floor(pos / g.l2Span);
    const chunkEnd = Math.min(end, (l1i + 1) * g.l2Span);
    const l2 = await getL2(s, l1i);
    try {
      while (pos < chunkEnd && !(firstOnly && out.length > 1)) {
        const ci = Math.floor(pos / g.clusterSize);
        const cEnd = Math.min(chunkEnd, (ci + 1) * g.clusterSize);
        segmentsOf(
          s,
          entryAt(s, l2, ci),
          ci,
          pos - ci * g.clusterSize,
          cEnd - ci * g.clusterSize,
          out,
        );
        pos = cEnd;
      }
    } finally {
      if (l2) s.l2Cache.unpin(l2);
    }
  }
  return out;
}

async function readSegment(s: Qcow2State, buf: Uint8Array, seg: Segment): Promise<void> {
  switch (seg.kind) {
    case 'zero':
      buf.fill(0);
      return;
    case 'data': {
      const n = await s.file.read(buf, seg.host);
      if (n < buf.length) buf.fill(0, n);
      return;
    }
    case 'backing': {
      const avail = s.backing ? Math.max(0, Math.min(buf.length, s.backingSize - seg.guest)) : 0;
      if (avail > 0) await s.backing!.read(buf.subarray(0, avail), seg.guest);
      if (avail < buf.length) buf.fill(0, avail);
      return;
    }
    case 'compressed': {
      const data = await readCompressed(s, seg.entry);
      buf.set(data.subarray(seg.within, seg.within + seg.length));
    }
  }
}

export async function readCompressed(s: Qcow2State, e: L2Entry): Promise<Uint8Array> {
  const bytes = e.sectors * 512 - (e.host % 512);
  const raw = new Uint8Array(bytes);
  const n = await s.file.read(raw, e.host);
  return decompressCluster(s.header.compressionType, raw.subarray(0, n), s.clusterSize);
}

/**
 * Reads guest bytes [offset, offset + buf.length) into `buf`.
 * Precondition: the range is within the disk (the generic layer checks bounds).
 */
export async function read(s: Qcow2State, buf: Uint8Array, offset: number): Promise<void> {
  const g = enter(s);
  try {
    const segs = await mapRange(s, offset, buf.length);
    await Promise.all(
      segs.map((seg) =>
        readSegment(s, buf.subarray(seg.guest - offset, seg.guest - offset + seg.length), seg),
      ),
    );
  } finally {
    leave(s, g);
  }
}

/** Block status of [offset, offset + length), coalesced. Precondition: within the disk. */
export async function blockStatus(
  s: Qcow2State,
  offset: number,
  length: number,
): Promise<Qcow2Extent[]> {
  const g = enter(s);
  try {
    const segs = await mapRange(s, offset, length);
    const out: Qcow2Extent[] = [];
    for (const seg of segs) {
      const x: Qcow2Extent =
        seg.kind === 'data'
          ? { offset: seg.guest, length: seg.length, status: 'data', hostOffset: seg.host }
          : seg.kind === 'compressed'
            ? { offset: seg.guest, length: seg.length, status: 'data', compressed: true }
            : seg.kind === 'zero'
              ? { offset: seg.guest, length: seg.length, status: 'zero' }
              : { offset: seg.guest, length: seg.length, status: 'unallocated' };
      const last = out[out.length - 1];
      if (
        last &&
        last.status === x.status &&
        !last.compressed &&
        !x.compressed &&
        last.offset + last.length === x.offset &&
        (x.status !== 'data' || last.hostOffset! + last.length === x.hostOffset)
      ) {
        last.length += x.length;
      } else out.push(x);
    }
    return out;
  } finally {
    leave(s, g);
  }
}

/** Fills `target` with the current content of guest bytes [guest, guest+len) of cluster `ci`. */
export async function readCurrent(
  s: Qcow2State,
  target: Uint8Array,
  e: L2Entry,
  ci: number,
  from: number,
): Promise<void> {
  const segs: Segment[] = [];
  segmentsOf(s, e, ci, from, from + target.length, segs);
  const base = ci * s.clusterSize + from;
  await Promise.all(
    segs.map((seg) =>
      readSegment(s, target.subarray(seg.guest - base, seg.guest - base + seg.length), seg),
    ),
  );
}

/** Reads the backing disk into `buf` (zeros past its end or without one). */
export async function readBelow(s: Qcow2State, buf: Uint8Array, offset: number): Promise<void> {
  if (buf.length === 0) return;
  await readSegment(s, buf, { kind: 'backing', guest: offset, length: buf.length });
}

/** Whether writing [from, to) of a cluster with entry `e` needs no metadata change. */
export function inPlace(s: Qcow2State, e: L2Entry, from: number, to: number): boolean {
  if (e.compressed || e.host === 0 || !e.copied) return false;
  const need = touchedMask(s, from, to);
  return ((e.alloc >>> 0) & need) === need;
}

/** The subclusters [from, to) of a cluster touches, as an L2 bitmap. */
export function touchedMask(s: Qcow2State, from: number, to: number): number {
  const sc = s.geom.subclusterSize;
  const a = Math.floor(from / sc);
  const b = Math.ceil(to / sc);
  let m = 0;
  for (let i = a; i < b; i++) m = (m | (2 ** i)) >>> 0;
  return m >>> 0;
}

/**
 * mapRead answered synchronously from the cache: null when the L2 table is not cached
 * (then use mapRead). Precondition as mapRead.
 */
export function mapReadCached(
  s: Qcow2State,
  offset: number,
  length: number,
): Qcow2ReadMapping | null {
  if (s.closed) return null;
  const g = s.geom;
  const l1i = Math.floor(offset / g.l2Span);
  const l2off = s.l1[l1i] ?? 0;
  const l2 = l2off === 0 ? null : s.l2Cache.peek(l2off);
  if (l2off !== 0 && !l2) return null;
  const end = Math.min(offset + length, (l1i + 1) * g.l2Span);
  const cs = g.clusterSize;
  const scs = g.subclusterSize;
  // The first run of segmentsOf, without building the segments (a read maps per cluster):
  // one kind, guest and host contiguous (-1: no host).
  let kind: Qcow2ReadMapping['kind'] = 'data';
  let host = -1;
  let pos = offset;
  try {
    run: while (pos < end) {
      const ci = Math.floor(pos / cs);
      const base = ci * cs;
      const cEnd = Math.min(end, base + cs);
      const e = entryAt(s, l2 ?? null, ci);
      if (e.compressed) {
        if (pos === offset) return { length: cEnd - pos, kind: 'compressed' };
        break;
      }
      while (pos < cEnd) {
        const sc = Math.floor((pos - base) / scs);
        const bit = 2 ** sc;
        const k = (e.alloc & bit) !== 0 ? 'data' : (e.zero & bit) !== 0 ? 'zero' : 'unallocated';
        const h = e.host !== 0 || k === 'data' ? e.host + (pos - base) : -1;
        if (pos === offset) {
          kind = k;
          host = h;
        } else if (k !== kind || (host < 0 ? h >= 0 : h !== host + (pos - offset))) {
          break run;
        }
        pos = Math.min(cEnd, base + (sc + 1) * scs);
      }
    }
  } catch {
    return null; // a corrupt entry: the asynchronous path reports it
  }
  if (kind === 'data') return { length: pos - offset, kind, host };
  return host < 0 ? { length: pos - offset, kind } : { length: pos - offset, kind, host };
}

/**
 * Where guest [offset, offset + length) lives, from offset on (one answer, stopping where
 * the kind or host contiguity changes or at an L2 table boundary). Precondition: within
 * the disk, length > 0.
 */
export async function mapRead(
  s: Qcow2State,
  offset: number,
  length: number,
): Promise<Qcow2ReadMapping> {
  const g = enter(s);
  try {
    const l2End = (Math.floor(offset / s.geom.l2Span) + 1) * s.geom.l2Span;
    const segs = await mapRange(s, offset, Math.min(length, l2End - offset), true);
    return readMappingOf(segs[0]!);
  } finally {
    leave(s, g);
  }
}
