// Compressed clusters written (as qemu-img convert -c does): each compressed cluster packed
// byte by byte after the previous one, host clusters shared and counted once per user.
// Reading them is mapping.ts's (readCompressed); the codecs are compress.ts's.

import { Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { write } from './allocation.ts';
import { encodeL2Compressed } from './cluster-map.ts';
import { compressClusterAsync, encodeCompressed } from './compress.ts';
import { entryAt, getOrCreateL2 } from './mapping.ts';
import { allocData } from './overlap.ts';
import {
  beforeMetadataChange,
  checkWritable,
  enter,
  freeLater,
  leave,
  type Qcow2State,
} from './state.ts';

/**
 * Writes one guest cluster compressed (as `qemu-img convert -c` does): `data` is the
 * whole cluster (the last one of the disk may be shorter: it is padded with zeros). Data
 * that does not compress below a cluster is written as a normal cluster. Compressed data
 * is packed byte by byte into host clusters shared with other compressed clusters.
 * Precondition: `offset` cluster aligned, within the disk.
 */
export async function writeCompressed(
  s: Qcow2State,
  data: Uint8Array,
  offset: number,
): Promise<void> {
  checkWritable(s);
  const cs = s.clusterSize;
  let full = data;
  if (data.length < cs) {
    full = new Uint8Array(cs);
    full.set(data);
  }
  const packed = await compressClusterAsync(s.header.compressionType, full);
  if (packed.length >= cs - 512) {
    await write(s, data, offset);
    return;
  }
  const g = enter(s);
  const ci = Math.floor(offset / cs);
  const l1i = Math.floor(offset / s.geom.l2Span);
  await s.clusterLocks.lockAll([ci]);
  try {
    await beforeMetadataChange(s);
    const l2 = await getOrCreateL2(s, l1i);
    try {
      const e = entryAt(s, l2, ci);
      const host = await allocBytes(s, packed.length);
      await s.file.write(packed, host);
      const sectors = Math.ceil(((host % 512) + packed.length) / 512);
      const [hi, lo] = encodeCompressed(host, sectors, s.geom.clusterBits);
      encodeL2Compressed(l2.data, ci % s.geom.l2Entries, hi, lo, s.geom);
      s.l2Cache.markDirty(l2);
      if (e.compressed) freeLater(s, e.host - (e.host % 512), e.sectors * 512);
      else if (e.host !== 0) freeLater(s, e.host, cs);
    } finally {
      s.l2Cache.unpin(l2);
    }
  } finally {
    s.clusterLocks.unlockAll([ci]);
    leave(s, g);
  }
}

/**
 * Host bytes for compressed data, each host cluster they touch counted once more. As
 * QEMU's qcow2_alloc_bytes, the data continues into freshly allocated clusters when they
 * follow the current one, so that compressed clusters are packed end to end (not one
 * host cluster per compressed cluster when each takes more than half of one).
 */
async function allocBytes(s: Qcow2State, size: number): Promise<number> {
  const cs = s.clusterSize;
  return s.bytesMutex.run(async () => {
    const t = s.byteTail;
    if (t && t.end - t.offset >= size) {
      const clusterStart = t.offset - (t.offset % cs);
      try {
        await s.refcounts.update(clusterStart, 1, 1);
        const at = t.offset;
        t.offset += size;
        return at;
      } catch (err) {
        if (!(err instanceof Qcow2Error) || err.code !== Qcow2ErrorCode.REFCOUNT_OVERFLOW)
          throw err;
        // refcount_bits too small to share the cluster: start a new one.
        s.byteTail = null;
      }
    }
    const tail = s.byteTail;
    if (tail && tail.end > tail.offset) {
      // Continue after the current cluster if what is allocated next follows it.
      const more = Math.ceil((size - (tail.end - tail.offset)) / cs);
      const next = await allocData(s, more);
      if (next === tail.end) {
        try {
          await s.refcounts.update(tail.offset - (tail.offset % cs), 1, 1);
          const at = tail.offset;
          const end = next + more * cs;
          s.byteTail = at + size < end ? { offset: at + size, end } : null;
          return at;
        } catch (err) {
          if (!(err instanceof Qcow2Error) || err.code !== Qcow2ErrorCode.REFCOUNT_OVERFLOW)
            throw err;
        }
      }
      // Not contiguous (or the current cluster cannot be shared): give those back.
      freeLater(s, next, more * cs);
    }
    const n = Math.ceil(size / cs);
    const base = await allocData(s, n);
    const end = base + n * cs;
    s.byteTail = base + size < end ? { offset: base + size, end } : null;
    return base;
  });
}
