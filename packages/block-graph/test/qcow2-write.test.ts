// Random writes, zero writes and discards (unaligned, many in flight) through our driver,
// the same operations applied to a plain buffer; then `qemu-img check` must find the image
// clean and `qemu-img compare` must find it identical to the buffer written as a raw file.

import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkQcow2 } from '../src/drivers/qcow2/check.ts';
import { openQcow2, type Qcow2Image } from '../src/drivers/qcow2/image.ts';
import type { Qcow2BackingReader, Qcow2File } from '../src/drivers/qcow2/types.ts';
import { firstDiff, ImageFile, pattern, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

interface Variant {
  name: string;
  opts: string;
  size: number;
  backing?: boolean;
  ops: number;
  maxLen: number;
  lazy?: boolean;
  l2CacheSize?: number;
  /** The refcount table must have moved (grown) by the end. */
  grows?: boolean;
}

const variants: Variant[] = [
  { name: 'v3 64k', opts: 'compat=1.1', size: 24 << 20, ops: 1500, maxLen: 200_000 },
  {
    name: 'v3 64k over a backing file',
    opts: 'compat=1.1',
    size: 24 << 20,
    backing: true,
    ops: 1500,
    maxLen: 200_000,
  },
  { name: 'v2 64k', opts: 'compat=0.10', size: 24 << 20, ops: 1000, maxLen: 200_000 },
  {
    name: 'v2 64k over a backing file',
    opts: 'compat=0.10',
    size: 16 << 20,
    backing: true,
    ops: 800,
    maxLen: 200_000,
  },
  {
    name: 'v3 extended L2 over a backing file',
    opts: 'extended_l2=on',
    size: 16 << 20,
    backing: true,
    ops: 1200,
    maxLen: 150_000,
  },
  {
    name: 'v3 extended L2 32k',
    opts: 'extended_l2=on,cluster_size=32k',
    size: 16 << 20,
    ops: 1000,
    maxLen: 100_000,
  },
  {
    name: 'v3 lazy refcounts, tiny L2 cache',
    opts: 'lazy_refcounts=on,cluster_size=4k',
    size: 16 << 20,
    lazy: true,
    ops: 1000,
    maxLen: 60_000,
    l2CacheSize: 3 * 4096,
  },
  {
    name: 'v3 8k clusters, refcount_bits=1',
    opts: 'cluster_size=8k,refcount_bits=1',
    size: 8 << 20,
    ops: 600,
    maxLen: 50_000,
  },
  {
    name: 'v3 2M clusters over a backing file',
    opts: 'cluster_size=2M',
    size: 16 << 20,
    backing: true,
    ops: 300,
    maxLen: 300_000,
  },
  {
    name: 'v3 512B clusters, refcount_bits=64 (refcount table grows)',
    opts: 'cluster_size=512,refcount_bits=64',
    size: 6 << 20,
    ops: 800,
    maxLen: 30_000,
    grows: true,
  },
];

async function rawReader(path: string): Promise<{ reader: Qcow2BackingReader; file: ImageFile }> {
  const file = await ImageFile.open(path, { readOnly: true });
  return { file, reader: { read: (b, o) => file.read(b, o), size: () => file.size() } };
}

describe('qcow2 write: random operations judged by qemu-img check and compare', () => {
  for (const [vi, v] of variants.entries()) {
    it(`${v.name}: ${v.ops} operations`, async () => {
      const path = join(dir, `w${vi}.qcow2`);
      const model = new Uint8Array(v.size);
      let backingRaw: Uint8Array | null = null;
      let backing: { reader: Qcow2BackingReader; file: ImageFile } | null = null;
      if (v.backing) {
        const base = join(dir, `w${vi}-base.raw`);
        backingRaw = pattern(new Uint8Array(v.size - (3 << 20)), vi + 100); // shorter than the image
        await writeFile(base, backingRaw);
        model.set(backingRaw);
        await qemuImgCreate(path, v.size, { o: v.opts, backing: base });
        backing = await rawReader(base);
      } else {
        await qemuImgCreate(path, v.size, { o: v.opts });
      }
      const info = JSON.parse(await must('qemu-img', ['info', '--output=json', path]));
      const cs: number = info['cluster-size'];
      const extended = v.opts.includes('extended_l2=on');
      const v3 = !v.opts.includes('compat=0.10');
      const unit = extended ? cs / 32 : cs;
      const file = await ImageFile.open(path);
      let img: Qcow2Image = await openQcow2(file, {
        backing: backing?.reader ?? null,
        ...(v.l2CacheSize ? { l2CacheSize: v.l2CacheSize } : {}),
      });
      const reftable0 = img.header.refcountTableOffset;
      const r = rng(vi * 7919 + 1);
      let done = 0;
      while (done < v.ops) {
        // A batch of operations on disjoint ranges, all in flight together.
        const batch: Array<() => Promise<void>> = [];
        const taken: Array<[number, number]> = [];
        const n = 1 + Math.floor(r() * 24);
        for (let k = 0; k < n && done < v.ops; k++) {
          const len = 1 + Math.floor(r() * (r() < 0.7 ? 9000 : v.maxLen));
          const off = Math.floor(r() * (v.size - len));
          if (taken.some(([a, b]) => off < b && a < off + len)) continue;
          taken.push([off, off + len]);
          done++;
          const kind = r();
          if (kind < 0.6) {
            const data = pattern(new Uint8Array(len), done);
            model.set(data, off);
            batch.push(() => img.write(data, off));
          } else if (kind < 0.8) {
            model.fill(0, off, off + len);
            const mayUnmap = r() < 0.5;
            batch.push(() => img.writeZeroes(off, len, { mayUnmap }));
          } else if (kind < 0.97) {
            // Discard: whole clusters (subclusters) in the range read as zeros afterwards,
            // except on v2 over a backing file (the backing shows through); the rest unchanged.
            const a = Math.ceil(off / unit) * unit;
            const b = Math.floor((off + len) / unit) * unit;
            for (let u = a; u < b; u += unit) {
              if (!extended && (u % cs !== 0 || u + cs > b)) continue;
              if (!v3 && backingRaw) {
                model.fill(0, u, u + unit);
                model.set(
                  backingRaw.subarray(
                    Math.min(u, backingRaw.length),
                    Math.min(u + unit, backingRaw.length),
                  ),
                  u,
                );
              } else model.fill(0, u, u + unit);
            }
            batch.push(() => img.discard(off, len));
          } else {
            batch.push(() => img.flush());
          }
        }
        await Promise.all(batch.map((f) => f()));
        if (r() < 0.02) {
          // Close and reopen in the middle.
          await img.close();
          img = await openQcow2(file, { backing: backing?.reader ?? null });
        }
      }
      // Read back through our driver before closing.
      const got = new Uint8Array(v.size);
      await img.read(got, 0);
      expect(firstDiff(got, model)).toBe(-1);
      if (v.grows) expect(img.header.refcountTableOffset).not.toBe(reftable0);
      await img.close();
      await file.close();
      await backing?.file.close();

      const check = await run('qemu-img', ['check', '-f', 'qcow2', path]);
      expect(check.stdout + check.stderr).toContain('No errors were found');
      expect(check.code).toBe(0);
      const rawPath = join(dir, `w${vi}.raw`);
      await writeFile(rawPath, model);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, rawPath]);
      expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
      expect(cmp.code).toBe(0);
      // Our own check agrees, and the dirty bit is clear after close.
      const f2 = await ImageFile.open(path, { readOnly: true });
      const ours = await checkQcow2(f2);
      expect(ours.messages).toEqual([]);
      expect(info.format).toBe('qcow2');
      const after = JSON.parse(await must('qemu-img', ['info', '--output=json', path]));
      expect(after['dirty-flag']).toBe(false);
      await f2.close();
    });
  }
});

describe('qcow2 write: allocation', () => {
  it('reuses discarded clusters instead of growing the file', async () => {
    const path = join(dir, 'reuse.qcow2');
    await qemuImgCreate(path, 32 << 20);
    const file = await ImageFile.open(path);
    const img = await openQcow2(file, { backing: null });
    const data = pattern(new Uint8Array(4 << 20), 1);
    await img.write(data, 0);
    await img.flush();
    const grown = await file.size();
    await img.discard(0, 4 << 20);
    await img.flush(); // the L2 change is on disk: the clusters return to the free pool
    expect(img.pendingFrees).toBe(0);
    await img.write(data, 16 << 20);
    await img.flush();
    expect(await file.size()).toBeLessThanOrEqual(grown + 65536); // at most one new L2 table
    const back = new Uint8Array(4 << 20);
    await img.read(back, 16 << 20);
    expect(firstDiff(back, data)).toBe(-1);
    await img.read(back, 0);
    expect(back.every((b) => b === 0)).toBe(true);
    await img.close();
    await file.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });

  it('passes discards of whole clusters down to the file (holes) once they are free', async () => {
    const path = join(dir, 'punch.qcow2');
    await qemuImgCreate(path, 16 << 20);
    const file = await ImageFile.open(path);
    const img = await openQcow2(file, { backing: null });
    await img.write(pattern(new Uint8Array(8 << 20), 2), 0);
    await img.flush();
    const full = (await stat(path)).blocks;
    await img.discard(0, 6 << 20);
    await img.flush();
    expect(img.pendingFrees).toBe(0);
    const after = (await stat(path)).blocks;
    expect(full - after).toBeGreaterThanOrEqual(((6 << 20) / 512) * 0.9);
    const back = new Uint8Array(8 << 20);
    await img.read(back, 0);
    expect(back.subarray(0, 6 << 20).every((x) => x === 0)).toBe(true);
    expect(
      firstDiff(back.subarray(6 << 20), pattern(new Uint8Array(8 << 20), 2).subarray(6 << 20)),
    ).toBe(-1);
    await img.close();
    await file.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });

  it('many writes in flight to the same clusters and L2 table, disjoint bytes', async () => {
    const path = join(dir, 'conc.qcow2');
    await qemuImgCreate(path, 8 << 20, { o: 'cluster_size=16k' });
    const file = await ImageFile.open(path);
    const img = await openQcow2(file, { backing: null });
    const model = new Uint8Array(8 << 20);
    const ops: Promise<void>[] = [];
    // 512 writes of 1000 bytes each, interleaved so that neighbours share clusters.
    for (let i = 0; i < 512; i++) {
      const off = ((i * 37) % 512) * 1000 + 3;
      const d = pattern(new Uint8Array(1000), i + 1);
      model.set(d, off);
      ops.push(img.write(d, off));
    }
    await Promise.all(ops);
    const got = new Uint8Array(8 << 20);
    await img.read(got, 0);
    expect(firstDiff(got, model)).toBe(-1);
    await img.close();
    await file.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    const rawPath = join(dir, 'conc.raw');
    await writeFile(rawPath, model);
    expect(
      (await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, rawPath])).code,
    ).toBe(0);
  });
});

describe('qcow2 write: allocation answered from cached metadata', () => {
  it('maps fresh clusters without waiting, holds their locks and links them only at commit', async () => {
    const path = join(dir, 'sync-alloc.qcow2');
    await qemuImgCreate(path, 4 << 20);
    const file = await ImageFile.open(path);
    const img = await openQcow2(file, { backing: null });
    const cs = 65536;
    await img.write(pattern(new Uint8Array(cs), 1), 0); // the L2 table and refcounts cached
    const m = img.mapWriteCached(2 * cs, 3 * cs);
    expect(m).not.toBeNull();
    expect(m!.length).toBe(3 * cs);
    expect(m!.allocation).toMatchObject({ start: 2 * cs, end: 5 * cs, from: 'zero' });
    // The clusters are locked until commit: a second write of one waits, then finds it ours.
    expect(img.mapWriteCached(3 * cs, cs)).toBeNull();
    const second = img.mapWrite(3 * cs, cs);
    const data = pattern(new Uint8Array(3 * cs), 2);
    await file.write(data, m!.host);
    // Crash safety: nothing points at the clusters before their data is written.
    expect((await img.mapRead(2 * cs, 3 * cs)).kind).toBe('unallocated');
    await m!.allocation.commit();
    const again = await second;
    expect(again.host).toBe(m!.host + cs);
    await again.allocation.commit();
    const back = new Uint8Array(3 * cs);
    await img.read(back, 2 * cs);
    expect(firstDiff(back, data)).toBe(-1);
    await img.close();
    await file.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });
  it('an aborted allocation of fresh clusters gives every one of them back (waiting and cached paths)', async () => {
    const path = join(dir, 'abort-alloc.qcow2');
    await qemuImgCreate(path, 4 << 20);
    const file = await ImageFile.open(path);
    const img = await openQcow2(file, { backing: null });
    const cs = 65536;
    // No L2 table yet: the waiting path takes the 4 clusters.
    const first = await img.mapWrite(cs, 4 * cs);
    expect(first.allocation).toMatchObject({ start: cs, end: 5 * cs });
    await first.allocation.abort(new Error('data write failed'));
    expect((await img.mapRead(cs, 4 * cs)).kind).toBe('unallocated');
    // All 4 were returned: the cached path finds the same run, and after its abort too.
    const second = img.mapWriteCached(cs, 4 * cs);
    expect(second?.host).toBe(first.host);
    await second!.allocation.abort(new Error('data write failed'));
    const third = img.mapWriteCached(cs, 4 * cs);
    expect(third?.host).toBe(first.host);
    const data = pattern(new Uint8Array(4 * cs), 3);
    await file.write(data, third!.host);
    await third!.allocation.commit();
    const back = new Uint8Array(4 * cs);
    await img.read(back, cs);
    expect(firstDiff(back, data)).toBe(-1);
    await img.close();
    await file.close();
    // No cluster leaked (qemu-img check exits 3 on leaks).
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });
});

describe('qcow2 write: races inside one cluster', () => {
  it('a write waiting for an allocation never rewrites bytes another write put there meanwhile', async () => {
    const path = join(dir, 'race.qcow2');
    await qemuImgCreate(path, '1M');
    const inner = await ImageFile.open(path);
    const cs = 65536;
    // Writes land late, whole-cluster ones later: what a slow disk (or io_uring) may do.
    const file: Qcow2File = {
      read: (b, o) => inner.read(b, o),
      write: async (b, o) => {
        await new Promise((r) => setTimeout(r, b.length >= cs ? 40 : 10));
        return inner.write(b, o);
      },
      size: () => inner.size(),
      truncate: (s) => inner.truncate(s),
      flush: () => inner.flush(),
    };
    const img = await openQcow2(file, { backing: null });
    const b = img.write(new Uint8Array(100).fill(1), 0); // allocates the cluster
    const a = img.write(new Uint8Array(100).fill(2), 1000); // waits for b's allocation
    await b;
    const c = img.write(new Uint8Array(100).fill(3), 5000); // in place, no lock
    await Promise.all([a, c]);
    const got = new Uint8Array(6000);
    await img.read(got, 0);
    expect(got.subarray(0, 100).every((x) => x === 1)).toBe(true);
    expect(got.subarray(1000, 1100).every((x) => x === 2)).toBe(true);
    expect(got.subarray(5000, 5100).every((x) => x === 3)).toBe(true);
    await img.close();
    await inner.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });
});
