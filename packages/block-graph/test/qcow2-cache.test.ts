// The metadata cache (L2 tables, refcount blocks) under concurrency: an entry handed to a
// caller is pinned from the moment it enters the cache, and an entry whose write-back is in
// flight is never evicted (reloading it from disk would give stale metadata).

import { describe, expect, it } from 'vitest';
import { MetadataCache } from '../src/drivers/qcow2/l2-cache.ts';

function cache(capacity: number, loads: number[], evicted: number[]) {
  // Every load waits for the same moment, so that they all complete in one go (as reads
  // reaped together from an io_uring completion queue do).
  const gate = new Promise((r) => setTimeout(r, 5));
  return new MetadataCache({
    capacity,
    entrySize: 16,
    load: async (offset, buf) => {
      await gate;
      loads.push(offset);
      buf.fill(offset & 0xff);
    },
    evictDirty: async (e) => {
      evicted.push(e.offset);
      e.dirty = false;
    },
  });
}

describe('qcow2 metadata cache', () => {
  it('entries loaded together are all pinned when their callers resume (capacity 2, 10 loads)', async () => {
    const loads: number[] = [];
    const c = cache(2, loads, []);
    const entries = await Promise.all(Array.from({ length: 10 }, (_, i) => c.get(i * 16)));
    expect(loads.length).toBe(10);
    for (const e of entries) {
      expect(e.pins).toBe(1);
      expect(c.peek(e.offset)).toBe(e); // still the cached object: changes to it are not lost
      expect(e.data[0]).toBe(e.offset & 0xff);
    }
    for (const e of entries) c.unpin(e);
    await c.get(1000).then((e) => c.unpin(e));
    expect(c.size).toBeLessThanOrEqual(2);
  });

  it('concurrent gets of one table share one load and one entry', async () => {
    const loads: number[] = [];
    const c = cache(2, loads, []);
    const [a, b, d] = await Promise.all([c.get(32), c.get(32), c.get(32)]);
    expect(loads).toEqual([32]);
    expect(a).toBe(b);
    expect(b).toBe(d);
    expect(a!.pins).toBe(3);
  });

  it('an entry whose write-back is in flight stays cached until it lands', async () => {
    const c = cache(2, [], []);
    const e = await c.get(0);
    c.markDirty(e);
    c.unpin(e);
    let land!: () => void;
    const writing = c.writeBack(e, () => new Promise<void>((r) => (land = r)));
    expect(e.dirty).toBe(false);
    for (let i = 1; i <= 5; i++) c.unpin(await c.get(i * 16));
    expect(c.peek(0)).toBe(e);
    land();
    await writing;
    for (let i = 6; i <= 8; i++) c.unpin(await c.get(i * 16));
    expect(c.peek(0)).toBeUndefined();
  });

  it('a snapshot taken for a later write keeps the entry cached from the moment it is taken', async () => {
    const c = cache(2, [], []);
    const e = await c.get(0);
    e.data[0] = 42;
    c.markDirty(e);
    c.unpin(e);
    const copy = c.beginWrite(e); // e.g. a flush that writes refcounts before L2 tables
    e.data[0] = 43; // later changes are not in the snapshot
    expect(copy[0]).toBe(42);
    for (let i = 1; i <= 5; i++) c.unpin(await c.get(i * 16));
    expect(c.peek(0)).toBe(e);
    c.endWrite(e, true, copy);
    for (let i = 6; i <= 8; i++) c.unpin(await c.get(i * 16));
    expect(c.peek(0)).toBeUndefined();
  });

  it('a failed write-back leaves the entry dirty', async () => {
    const c = cache(2, [], []);
    const e = await c.get(0);
    e.dirty = false;
    await expect(c.writeBack(e, async () => Promise.reject(new Error('EIO')))).rejects.toThrow(
      'EIO',
    );
    expect(e.dirty).toBe(true);
    expect(e.writing).toBe(0);
  });
});
