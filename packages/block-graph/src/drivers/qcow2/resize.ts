// block_resize of a qcow2 image (QEMU's qcow2_co_truncate without preallocation) and the
// header change of stream and commit (qcow2_change_backing_file). Both run drained: no
// request is in flight, so the L1 table and the header are not being written meanwhile.
//
// Growing: a larger L1 table when the new size needs more entries (written, its refcounts
// on disk, then the header points at it, then the old one is freed), then the size in the
// header. Shrinking (QEMU 7.2 shrinks too): the clusters wholly past the new end are
// discarded first; the L1 table keeps its length (entries past the end are unused).
import { Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { encodeL1 } from './cluster-map.ts';
import { flushMetadata } from './flush.ts';
import { Incompat, l1EntriesFor } from './header.ts';
import { checkWritable, type Qcow2State, writeHeader } from './state.ts';
import { discard } from './zero.ts';

export async function resizeQcow2(s: Qcow2State, size: number): Promise<void> {
  checkWritable(s);
  if (size % 512 !== 0) {
    throw new Qcow2Error(Qcow2ErrorCode.BAD_OPTION, 'The new size must be a multiple of 512');
  }
  const old = s.header.size;
  if (size === old) return;
  if (size < old) {
    if (s.header.nbSnapshots > 0) {
      throw new Qcow2Error(
        Qcow2ErrorCode.BAD_OPTION,
        "Can't shrink an image with internal snapshots",
      );
    }
    const from = Math.ceil(size / s.clusterSize) * s.clusterSize;
    if (from < old) await discard(s, from, old - from);
  } else {
    const extended = (s.header.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n;
    const need = l1EntriesFor(size, s.header.clusterBits, extended);
    if (need > s.l1.length) await growL1(s, need);
  }
  await flushMetadata(s);
  const before = s.header.size;
  s.header.size = size;
  try {
    await writeHeader(s);
  } catch (err) {
    s.header.size = before;
    throw err;
  }
}

/** Moves the L1 table to a new place with room for `need` entries (QEMU's qcow2_grow_l1_table). */
export async function growL1(s: Qcow2State, need: number): Promise<void> {
  await flushMetadata(s); // every L1 entry of the old table on disk
  const cluster = s.clusterSize;
  const clusters = Math.ceil((need * 8) / cluster);
  const at = await s.refcounts.allocate(clusters);
  const buf = new Uint8Array(clusters * cluster);
  const dv = new DataView(buf.buffer);
  for (let i = 0; i < s.l1.length; i++) encodeL1(dv, i * 8, s.l1[i]!, s.l1Copied[i]!);
  await s.file.write(buf, at);
  await s.refcounts.writeDirty();
  await s.file.flush();
  const oldAt = s.header.l1TableOffset;
  const oldBytes = Math.ceil((s.header.l1Size * 8) / cluster) * cluster;
  s.header.l1TableOffset = at;
  s.header.l1Size = need;
  await writeHeader(s);
  while (s.l1.length < need) {
    s.l1.push(0);
    s.l1Copied.push(false);
  }
  if (oldBytes > 0) {
    await s.refcounts.update(oldAt, oldBytes, -1);
    await s.refcounts.writeDirty();
  }
}

/** Writes another backing file name and format into the header (null: none). */
export async function changeBackingFile(
  s: Qcow2State,
  filename: string | null,
  format: string | null,
): Promise<void> {
  checkWritable(s);
  const h = s.header;
  const before = { file: h.backingFile, format: h.backingFormat };
  h.backingFile = filename;
  h.backingFormat = filename === null ? null : format;
  try {
    await writeHeader(s);
  } catch (err) {
    h.backingFile = before.file;
    h.backingFormat = before.format;
    throw err;
  }
}
