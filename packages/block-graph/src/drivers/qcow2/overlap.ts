// Metadata overlap checks (QEMU's qcow2_check_metadata_overlap, its cached mode): a data
// cluster must never be a header, L1, L2 or refcount cluster. Finding one means the
// refcounts or the tables are wrong: the image is marked corrupt and writes refused.

import { markCorrupt, type Qcow2State } from './state.ts';

/** Whether host cluster `offset` holds metadata (QEMU's overlap check, cached mode). */
export function isMetadata(s: Qcow2State, offset: number): boolean {
  const h = s.header;
  if (offset < s.clusterSize) return true;
  if (offset >= h.l1TableOffset && offset < h.l1TableOffset + h.l1Size * 8) return true;
  if (s.l2Offsets.has(offset)) return true;
  return s.refcounts.isRefcountMetadata(offset);
}

export async function checkDataHost(s: Qcow2State, host: number, length: number): Promise<void> {
  const cs = s.clusterSize;
  for (let c = host - (host % cs); c < host + length; c += cs) {
    if (isMetadata(s, c)) {
      await markCorrupt(s, `data cluster at ${c} overlaps metadata`);
    }
  }
}

/** Allocates `n` contiguous data clusters, refusing any that overlaps metadata. */
export async function allocData(s: Qcow2State, n: number): Promise<number> {
  const cs = s.clusterSize;
  const base = await s.refcounts.allocate(n);
  for (let c = 0; c < n; c++) {
    if (isMetadata(s, base + c * cs)) {
      await markCorrupt(
        s,
        `allocated cluster ${base + c * cs} overlaps metadata (refcounts are wrong)`,
      );
    }
  }
  return base;
}
