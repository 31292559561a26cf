// The internal snapshot table (docs/interop/qcow2.txt, "Snapshots"): entries of 40 bytes,
// their extra data (vm_state_size_large, disk_size, icount; more is kept unchanged), the id
// and the name, each entry padded to 8 bytes. Written as QEMU writes it: the new table in
// clusters of its own, on disk before the header points to it; the old one freed after.

import { Qcow2CorruptError, Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import type { Qcow2State } from './state.ts';
import { writeHeader } from './state.ts';
import { ioBuffer, releaseIoBuffer } from './types.ts';

/** QEMU's limits: at most 65536 snapshots, a table of at most 64 MiB, 1 KiB of extra data. */
export const MAX_SNAPSHOTS = 65536;
const MAX_TABLE_BYTES = 64 * 1024 * 1024;
const MAX_EXTRA_DATA = 1024;
/** The extra data QEMU writes: vm_state_size_large, disk_size and icount. */
const EXTRA_DATA_SIZE = 24;

export interface Qcow2Snapshot {
  /** The unique id (QEMU's are decimal numbers). */
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** The virtual disk size when the snapshot was taken. */
  diskSize: number;
  /** Instruction count (-1n: none). */
  icount: bigint;
  /** Extra data past the fields above (a newer writer's), kept as it is. */
  unknownExtra: Uint8Array;
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** Reads the snapshot table the header points to. */
export async function readSnapshotTable(s: Qcow2State): Promise<Qcow2Snapshot[]> {
  return (await readTable(s)).list;
}

/** The snapshot table and its length in bytes. */
async function readTable(s: Qcow2State): Promise<{ list: Qcow2Snapshot[]; bytes: number }> {
  const h = s.header;
  if (h.nbSnapshots === 0) return { list: [], bytes: 0 };
  if (h.nbSnapshots > MAX_SNAPSHOTS)
    throw new Qcow2CorruptError(`${h.nbSnapshots} snapshots (at most ${MAX_SNAPSHOTS})`);
  const out: Qcow2Snapshot[] = [];
  let off = h.snapshotsOffset;
  const head = new Uint8Array(40);
  for (let k = 0; k < h.nbSnapshots; k++) {
    if ((await s.file.read(head, off)) < 40)
      throw new Qcow2CorruptError(`snapshot table entry ${k} at ${off} is truncated`);
    const dv = new DataView(head.buffer);
    const idSize = dv.getUint16(12);
    const nameSize = dv.getUint16(14);
    const extraSize = dv.getUint32(36);
    if (extraSize > MAX_EXTRA_DATA)
      throw new Qcow2CorruptError(`snapshot ${k} has ${extraSize} bytes of extra data`);
    const rest = new Uint8Array(extraSize + idSize + nameSize);
    if ((await s.file.read(rest, off + 40)) < rest.length)
      throw new Qcow2CorruptError(`snapshot table entry ${k} at ${off} is truncated`);
    const ev = new DataView(rest.buffer);
    const l1TableOffset = Number(dv.getBigUint64(0));
    const l1Size = dv.getUint32(8);
    if (l1TableOffset % s.clusterSize !== 0 || l1Size * 8 > 32 * 1024 * 1024)
      throw new Qcow2CorruptError(`snapshot ${k}: L1 table ${l1TableOffset} (${l1Size}) invalid`);
    out.push({
      l1TableOffset,
      l1Size,
      dateSec: dv.getUint32(16),
      dateNsec: dv.getUint32(20),
      vmClockNsec: dv.getBigUint64(24),
      vmStateSize: extraSize >= 8 ? Number(ev.getBigUint64(0)) : dv.getUint32(32),
      diskSize: extraSize >= 16 ? Number(ev.getBigUint64(8)) : h.size,
      icount: extraSize >= 24 ? ev.getBigInt64(16) : -1n,
      unknownExtra: rest.slice(Math.min(extraSize, EXTRA_DATA_SIZE), extraSize),
      id: decoder.decode(rest.subarray(extraSize, extraSize + idSize)),
      name: decoder.decode(rest.subarray(extraSize + idSize)),
    });
    off += Math.ceil((40 + rest.length) / 8) * 8;
  }
  return { list: out, bytes: off - h.snapshotsOffset };
}

/** The table's bytes (unpadded to clusters). */
export function serializeSnapshotTable(list: readonly Qcow2Snapshot[]): Uint8Array {
  const parts = list.map((sn) => {
    const id = encoder.encode(sn.id);
    const name = encoder.encode(sn.name);
    const extraSize = EXTRA_DATA_SIZE + sn.unknownExtra.length;
    const len = Math.ceil((40 + extraSize + id.length + name.length) / 8) * 8;
    const buf = new Uint8Array(len);
    const dv = new DataView(buf.buffer);
    dv.setBigUint64(0, BigInt(sn.l1TableOffset));
    dv.setUint32(8, sn.l1Size);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, sn.dateSec);
    dv.setUint32(20, sn.dateNsec);
    dv.setBigUint64(24, sn.vmClockNsec);
    // The 32-bit field holds the size when it fits (QEMU's rule), the large one always.
    dv.setUint32(32, sn.vmStateSize > 0xffffffff ? 0 : sn.vmStateSize);
    dv.setUint32(36, extraSize);
    dv.setBigUint64(40, BigInt(sn.vmStateSize));
    dv.setBigUint64(48, BigInt(sn.diskSize));
    dv.setBigInt64(56, sn.icount);
    buf.set(sn.unknownExtra, 64);
    buf.set(id, 40 + extraSize);
    buf.set(name, 40 + extraSize + id.length);
    return buf;
  });
  const total = parts.reduce((n, p) => n + p.length, 0);
  if (total > MAX_TABLE_BYTES)
    throw new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, 'Snapshot table too large');
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Replaces the snapshot table by `list`: the new table is written and flushed in clusters
 * of its own, then the header points to it (nb_snapshots and snapshots_offset together),
 * then the old table is freed. A crash at any point leaves one table or the other, at
 * worst leaked clusters. Precondition: refcount changes the new table depends on are on disk.
 */
export async function writeSnapshotTable(
  s: Qcow2State,
  list: readonly Qcow2Snapshot[],
): Promise<void> {
  if (list.length > MAX_SNAPSHOTS)
    throw new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, 'Too many snapshots');
  const h = s.header;
  const cs = s.clusterSize;
  const oldOffset = h.snapshotsOffset;
  const oldBytes = (await readTable(s)).bytes;
  let offset = 0;
  if (list.length > 0) {
    const data = serializeSnapshotTable(list);
    const clusters = Math.ceil(data.length / cs);
    offset = await s.refcounts.allocate(clusters);
    const buf = ioBuffer(s.file, clusters * cs);
    try {
      buf.set(data);
      await s.file.write(buf, offset);
    } finally {
      releaseIoBuffer(s.file, buf);
    }
    await s.refcounts.writeDirty();
    await s.file.flush();
  }
  h.nbSnapshots = list.length;
  h.snapshotsOffset = offset;
  await writeHeader(s);
  if (oldBytes > 0) {
    await s.refcounts.update(oldOffset, oldBytes, -1);
    await s.refcounts.writeDirty();
    await s.file.flush();
  }
}
