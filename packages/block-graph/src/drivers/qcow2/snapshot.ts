// Internal snapshots (docs/interop/qcow2.txt "Snapshots"; what QEMU's qcow2-snapshot.c
// does): create copies the active L1 table and adds a reference to every cluster it
// reaches (clearing COPIED: the clusters are shared from then on, writes copy them first);
// apply makes a snapshot's L1 table the active one; delete drops the snapshot's references.
//
// Crash safety, as QEMU orders it: create raises refcounts and puts them on disk before the
// snapshot table names the snapshot (a crash leaks); delete removes the snapshot from the
// table before it lowers any refcount; apply raises the snapshot's refcounts, then
// overwrites the active L1 table, then lowers the old table's. Refcount blocks are always
// written (and flushed) before the L2 and L1 tables whose COPIED flags follow them.
//
// The operations work on an image with no request in flight (what `qemu-img snapshot`
// does offline); the image's caches stay consistent, so it may be written afterwards.

import { Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { decodeL2, encodeL1, encodeL2, parseL1 } from './cluster-map.ts';
import { writeBack } from './flush.ts';
import { openQcow2, type Qcow2Image } from './image.ts';
import { growL1 } from './resize.ts';
import {
  MAX_SNAPSHOTS,
  type Qcow2Snapshot,
  readSnapshotTable,
  writeSnapshotTable,
} from './snapshot-table.ts';
import { checkWritable, type Qcow2State, writeHeader } from './state.ts';
import { ioBuffer, type Qcow2File, releaseIoBuffer } from './types.ts';

export type { Qcow2Snapshot };

/** What a new snapshot records besides the disk (qemu-img's: the wall clock only). */
export interface SnapshotCreateOptions {
  name: string;
  /** Milliseconds since the epoch (default now). */
  date?: number;
  vmClockNsec?: bigint;
  icount?: bigint;
}

/** Which snapshot: by id, by name, or (idOrName) by id first, then by name. */
export type SnapshotSelector = { id?: string; name?: string } | { idOrName: string };

export class Qcow2SnapshotNotFound extends Qcow2Error {
  override name = 'Qcow2SnapshotNotFound';
  constructor(what: string) {
    super(Qcow2ErrorCode.SNAPSHOT_NOT_FOUND, `Can't find the snapshot ${what}`);
  }
}

/**
 * Opens the qcow2 image in `file` (without its backing file: snapshots do not read it),
 * runs `op` on it and closes it: what `qemu-img snapshot` does to an image.
 */
export async function withQcow2File<T>(
  file: Qcow2File,
  readOnly: boolean,
  op: (image: Qcow2Image) => Promise<T>,
): Promise<T> {
  const image = await openQcow2(file, { readOnly, backing: null });
  try {
    return await op(image);
  } finally {
    await image.close();
  }
}

/** The image's internal snapshots, in table order. */
export function listSnapshots(image: Qcow2Image): Promise<Qcow2Snapshot[]> {
  return readSnapshotTable(image.state);
}

/** The index in `list` of the snapshot `sel` names (QEMU's lookup rules), or -1. */
export function findSnapshot(list: readonly Qcow2Snapshot[], sel: SnapshotSelector): number {
  if ('idOrName' in sel) {
    const byId = list.findIndex((sn) => sn.id === sel.idOrName);
    return byId >= 0 ? byId : list.findIndex((sn) => sn.name === sel.idOrName);
  }
  return list.findIndex(
    (sn) =>
      (sel.id === undefined || sn.id === sel.id) &&
      (sel.name === undefined || sn.name === sel.name),
  );
}

function describe(sel: SnapshotSelector): string {
  return 'idOrName' in sel ? `'${sel.idOrName}'` : `'${sel.id ?? sel.name ?? ''}'`;
}

/** Creates a snapshot of the disk as it is now; returns it (its id is the next number). */
export async function createSnapshot(
  image: Qcow2Image,
  opts: SnapshotCreateOptions,
): Promise<Qcow2Snapshot> {
  const s = image.state;
  checkWritable(s);
  await writeBack(s);
  const list = await readSnapshotTable(s);
  if (list.length >= MAX_SNAPSHOTS)
    throw new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, 'There are too many snapshots');
  // QEMU's find_new_snapshot_id: one more than the largest numeric id.
  let max = 0;
  for (const sn of list) max = Math.max(max, Number.parseInt(sn.id, 10) || 0);

  // The copy of the active L1 table, then a reference more to everything it reaches.
  const h = s.header;
  const l1TableOffset =
    h.l1Size > 0 ? await s.refcounts.allocate(Math.ceil((h.l1Size * 8) / s.clusterSize)) : 0;
  if (h.l1Size > 0) await writeL1(s, l1TableOffset, s.l1, s.l1Copied);
  const copied = await updateRefcounts(s, s.l1, 1);
  setActiveCopied(s, copied);
  await sync(s);

  const date = opts.date ?? Date.now();
  const sn: Qcow2Snapshot = {
    id: String(max + 1),
    name: opts.name,
    l1TableOffset,
    l1Size: h.l1Size,
    dateSec: Math.floor(date / 1000),
    dateNsec: Math.floor(date % 1000) * 1_000_000,
    vmClockNsec: opts.vmClockNsec ?? 0n,
    vmStateSize: 0,
    diskSize: h.size,
    icount: opts.icount ?? 0n,
    unknownExtra: new Uint8Array(0),
  };
  await writeSnapshotTable(s, [...list, sn]);
  return sn;
}

/** The image made writable (its caches written back), its table, and the snapshot `sel` names. */
async function openSnapshot(image: Qcow2Image, sel: SnapshotSelector) {
  const s = image.state;
  checkWritable(s);
  await writeBack(s);
  const list = await readSnapshotTable(s);
  const k = findSnapshot(list, sel);
  if (k < 0) throw new Qcow2SnapshotNotFound(describe(sel));
  return { s, list, k, sn: list[k]! };
}

/** Makes the snapshot `sel` names the active disk (what was written since is dropped). */
export async function applySnapshot(image: Qcow2Image, sel: SnapshotSelector): Promise<void> {
  const { s, sn } = await openSnapshot(image, sel);
  const h = s.header;
  // As QEMU's qcow2_snapshot_goto: the active table grown to hold the snapshot's whole
  // (the image was shrunk, or its table written smaller, since the snapshot).
  if (sn.l1Size > h.l1Size) await growL1(s, sn.l1Size);
  const snL1 = await readL1(s, sn.l1TableOffset, sn.l1Size);
  await updateRefcounts(s, snL1.offsets, 1);
  await sync(s);

  // The active L1 table becomes the snapshot's (the rest of it empty).
  const offsets = new Array<number>(h.l1Size).fill(0);
  const flags = new Array<boolean>(h.l1Size).fill(false);
  snL1.offsets.forEach((o, i) => {
    offsets[i] = o;
    flags[i] = snL1.copied[i]!;
  });
  await writeL1(s, h.l1TableOffset, offsets, flags);
  await s.file.flush();
  const old = s.l1;
  s.l1 = offsets;
  s.l1Copied = flags;
  s.l1Dirty.clear();
  s.l2Offsets.clear();
  for (const o of offsets) if (o !== 0) s.l2Offsets.add(o);

  await updateRefcounts(s, old, -1);
  setActiveCopied(s, await updateRefcounts(s, s.l1, 0));
  if (sn.diskSize !== h.size && sn.diskSize > 0) {
    h.size = sn.diskSize;
    await writeHeader(s);
  }
  await sync(s);
}

/** Deletes the snapshot `sel` names; clusters only it referenced are freed. */
export async function deleteSnapshot(image: Qcow2Image, sel: SnapshotSelector): Promise<void> {
  const { s, list, k, sn } = await openSnapshot(image, sel);
  await writeSnapshotTable(
    s,
    list.filter((_, i) => i !== k),
  );
  const snL1 = await readL1(s, sn.l1TableOffset, sn.l1Size);
  await updateRefcounts(s, snL1.offsets, -1);
  if (sn.l1Size > 0) await s.refcounts.update(sn.l1TableOffset, sn.l1Size * 8, -1);
  setActiveCopied(s, await updateRefcounts(s, s.l1, 0));
  await sync(s);
}

/** Refcounts first (flushed), then the L2 tables and L1 entries they decide the flags of. */
async function sync(s: Qcow2State): Promise<void> {
  await s.refcounts.writeDirty();
  await s.file.flush();
  await writeBack(s);
}

function setActiveCopied(s: Qcow2State, copied: boolean[]): void {
  copied.forEach((c, i) => {
    if (s.l1[i] !== 0 && s.l1Copied[i] !== c) {
      s.l1Copied[i] = c;
      s.l1Dirty.add(i);
    }
  });
}

/** Reads an L1 table (a snapshot's) of `entries` entries at `offset`. */
export async function readL1(
  s: Qcow2State,
  offset: number,
  entries: number,
): Promise<{ offsets: number[]; copied: boolean[] }> {
  if (entries === 0) return { offsets: [], copied: [] };
  const buf = ioBuffer(s.file, entries * 8);
  try {
    const n = await s.file.read(buf, offset);
    if (n < buf.length)
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `snapshot L1 table at ${offset} is truncated`);
    return parseL1(buf);
  } finally {
    releaseIoBuffer(s.file, buf);
  }
}

async function writeL1(
  s: Qcow2State,
  offset: number,
  offsets: readonly number[],
  copied: readonly boolean[],
): Promise<void> {
  const buf = ioBuffer(s.file, offsets.length * 8);
  try {
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    offsets.forEach((o, i) => {
      encodeL1(dv, i * 8, o, copied[i] ?? false);
    });
    await s.file.write(buf, offset);
  } finally {
    releaseIoBuffer(s.file, buf);
  }
}

/**
 * Adds `addend` (+1, -1 or 0) to the refcount of every L2 table the L1 entries `l1` point
 * to and of every cluster those tables reference, and sets the COPIED flag of each L2
 * entry to "refcount is one" (QEMU's qcow2_update_snapshot_refcount). Returns that flag
 * for each L1 entry. A table whose refcount drops to zero leaves the cache unwritten.
 */
async function updateRefcounts(
  s: Qcow2State,
  l1: readonly number[],
  addend: number,
): Promise<boolean[]> {
  const g = s.geom;
  const cs = s.clusterSize;
  const rc = s.refcounts;
  const copied = new Array<boolean>(l1.length).fill(false);
  for (const [i, l2Offset] of l1.entries()) {
    if (l2Offset === 0) continue;
    const t = await s.l2Cache.get(l2Offset);
    try {
      for (let j = 0; j < g.l2Entries; j++) {
        const e = decodeL2(t.data, j, g);
        if (e.host === 0) continue;
        if (e.compressed) {
          if (addend !== 0) await rc.update(e.host - (e.host % 512), e.sectors * 512, addend);
          continue;
        }
        if (addend !== 0) await rc.update(e.host, cs, addend);
        const one = (await rc.get(e.host / cs)) === 1;
        if (one !== e.copied) {
          encodeL2(t.data, j, { ...e, copied: one }, g);
          s.l2Cache.markDirty(t);
        }
      }
    } finally {
      s.l2Cache.unpin(t);
    }
    if (addend !== 0) await rc.update(l2Offset, cs, addend);
    const count = await rc.get(l2Offset / cs);
    if (count === 0) {
      s.l2Cache.drop(l2Offset);
      s.l2Offsets.delete(l2Offset);
    }
    copied[i] = count === 1;
  }
  return copied;
}
