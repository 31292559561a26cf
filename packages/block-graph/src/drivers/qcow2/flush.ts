// Metadata write-back in crash-safe order and the deferred frees (QEMU's qcow2-cache.c
// flush and the freeing half of qcow2-refcount.c): refcount blocks, flush, L2 tables,
// flush, L1 entries, flush; then the clusters freed by the L2 changes now on disk go back
// to the refcounts, once no request that might still use them is in flight.

import { encodeL1 } from './cluster-map.ts';
import { minActive, type PendingFree, type Qcow2State } from './state.ts';

export function flushMetadata(s: Qcow2State): Promise<void> {
  return s.flushMutex.run(async () => {
    // Snapshot first (synchronously): every L2 entry in it was set after its refcount
    // increment, which the refcount write below therefore includes. The snapshotted
    // tables stay cached until their snapshot has landed (beginWrite/endWrite).
    const l2Snap = s.l2Cache.dirtyEntries().map((e) => ({ e, copy: s.l2Cache.beginWrite(e) }));
    let l2Done = false;
    const l1Snap = [...s.l1Dirty];
    s.l1Dirty.clear();
    const l1Copy = s.l1.slice();
    const l1CopiedCopy = s.l1Copied.slice();
    const freeCut = s.pendingFrees.length;
    try {
      // With lazy refcounts the dirty bit covers stale refcounts: they are written on close.
      if (!s.lazyRefcounts) await s.refcounts.writeDirty();
      if (l2Snap.length > 0 || l1Snap.length > 0) {
        await s.file.flush();
        await Promise.all(l2Snap.map((x) => s.file.write(x.copy, x.e.offset)));
        l2Done = true;
        for (const x of l2Snap) s.l2Cache.endWrite(x.e, true, x.copy);
        if (l1Snap.length > 0) {
          await s.file.flush();
          const sectors = new Set(l1Snap.map((i) => Math.floor(i / 64)));
          await Promise.all(
            [...sectors].map((sec) => {
              const first = sec * 64;
              const n = Math.min(64, l1Copy.length - first);
              const buf = new Uint8Array(n * 8);
              const dv = new DataView(buf.buffer);
              for (let j = 0; j < n; j++)
                encodeL1(dv, j * 8, l1Copy[first + j]!, l1CopiedCopy[first + j]!);
              return s.file.write(buf, s.header.l1TableOffset + first * 8);
            }),
          );
        }
      } else l2Done = true;
      await s.file.flush();
    } catch (err) {
      if (!l2Done) for (const x of l2Snap) s.l2Cache.endWrite(x.e, false, x.copy);
      for (const i of l1Snap) s.l1Dirty.add(i);
      throw err;
    }
    // The L2 changes recorded before the snapshot are on disk: their frees may proceed once
    // no request that started before them is still running.
    const min = minActive(s);
    const keep: PendingFree[] = [];
    const apply: PendingFree[] = [];
    s.pendingFrees.forEach((f, i) => {
      if (i < freeCut && f.gen < min) apply.push(f);
      else keep.push(f);
    });
    s.pendingFrees = keep;
    if (apply.length > 0) await s.bytesMutex.lock();
    try {
      for (const f of apply) {
        // The cluster compressed data is being packed into may become free: stop packing.
        const t = s.byteTail;
        const tailCluster = t ? t.offset - (t.offset % s.clusterSize) : 0;
        if (t && f.offset < t.end && f.offset + f.bytes > tailCluster) s.byteTail = null;
      }
    } finally {
      if (apply.length > 0) s.bytesMutex.unlock();
    }
    for (const f of apply) {
      // A data cluster nothing refers to any more goes back to the file too (QEMU's
      // pass-discard-request), before its refcount drops: until then nobody can reuse it.
      if (f.passDown && s.file.discard && (await s.refcounts.get(f.offset / s.clusterSize)) === 1) {
        await s.file.discard(f.offset, f.bytes).catch(() => {});
      }
      await s.refcounts.update(f.offset, f.bytes, -1);
    }
  });
}

/**
 * Writes everything back with the freed clusters returned: twice (the first returns freed
 * clusters to the refcounts, the second writes them), the refcounts, a flush.
 */
export async function writeBack(s: Qcow2State): Promise<void> {
  await flushMetadata(s);
  await flushMetadata(s);
  await s.refcounts.writeDirty();
  await s.file.flush();
}
