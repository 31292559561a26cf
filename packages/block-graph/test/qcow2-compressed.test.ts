// Compressed clusters beyond reading: our check counts them as qemu-img does, writes into
// them copy the cluster out (freeing its share of the host clusters), and a dirty image
// holding them has its refcounts rebuilt right.

import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkQcow2, readHeader } from '../src/drivers/qcow2/check.ts';
import {
  compressCluster,
  compressClusterAsync,
  decompressCluster,
} from '../src/drivers/qcow2/compress.ts';
import { CompressionType, serializeHeader } from '../src/drivers/qcow2/header.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { qcow2Driver } from '../src/drivers/qcow2/qcow2.ts';
import { BlockGraph, blockDirtyBitmapAdd } from '../src/index.ts';
import { firstDiff, ImageFile, pattern, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

const SIZE = 4 << 20;

/** A raw disk of compressible content and its `qemu-img convert -c` image. */
async function compressed(name: string, opts: string): Promise<{ path: string; raw: Uint8Array }> {
  const raw = new Uint8Array(SIZE);
  const r = rng(name.length * 31);
  for (let off = 0; off < SIZE; ) {
    const len = Math.min(SIZE - off, 500 + Math.floor(r() * 90_000));
    const kind = r();
    if (kind < 0.5) for (let j = 0; j < len; j++) raw[off + j] = (j % 13) + 40;
    else if (kind < 0.75) pattern(raw.subarray(off, off + len), off);
    off += len;
  }
  const rawPath = join(dir, `${name}.raw`);
  const path = join(dir, `${name}.qcow2`);
  await writeFile(rawPath, raw);
  await must('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, rawPath, path]);
  return { path, raw };
}

async function expectIdentical(path: string, model: Uint8Array): Promise<void> {
  const check = await run('qemu-img', ['check', path]);
  expect(check.stdout).toContain('No errors were found');
  const rawPath = `${path}.model`;
  await writeFile(rawPath, model);
  const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, rawPath]);
  expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
}

describe('qcow2 compressed clusters', () => {
  for (const type of ['zlib', 'zstd']) {
    it(`our check finds a ${type} image from qemu-img convert -c clean`, async () => {
      const { path } = await compressed(`chk-${type}`, `compression_type=${type},cluster_size=16k`);
      const f = await ImageFile.open(path, { readOnly: true });
      const c = await checkQcow2(f);
      await f.close();
      expect(c.messages).toEqual([]);
      expect(c.allocatedClusters).toBeGreaterThan(3);
    });
  }

  it('writes, zero writes and discards over compressed clusters (core)', async () => {
    const { path, raw } = await compressed('w-core', 'cluster_size=16k');
    const model = raw.slice();
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    const r = rng(5);
    for (let i = 0; i < 200; i++) {
      const len = 1 + Math.floor(r() * 40_000);
      const off = Math.floor(r() * (SIZE - len));
      const k = r();
      if (k < 0.6) {
        const d = pattern(new Uint8Array(len), i + 1);
        model.set(d, off);
        await img.write(d, off);
      } else if (k < 0.8) {
        model.fill(0, off, off + len);
        await img.writeZeroes(off, len, { mayUnmap: r() < 0.5 });
      } else {
        const a = Math.ceil(off / 16384) * 16384;
        const b = Math.floor((off + len) / 16384) * 16384;
        if (b > a) model.fill(0, a, b);
        await img.discard(off, len);
      }
    }
    const got = new Uint8Array(SIZE);
    await img.read(got, 0);
    expect(firstDiff(got, model)).toBe(-1);
    await img.close();
    await f.close();
    await expectIdentical(path, model);
  });

  it('writes over compressed clusters through the graph', async () => {
    const { path, raw } = await compressed('w-graph', 'cluster_size=64k,compression_type=zstd');
    const model = raw.slice();
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    await g.add({ driver: 'qcow2', 'node-name': 'disk', file: { driver: 'file', filename: path } });
    const b = await g.createBackend('disk', { write: true });
    const r = rng(6);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 100; i++) {
      const len = 1 + Math.floor(r() * 5000);
      const off = i * 40_000 + Math.floor(r() * 30_000); // disjoint
      const d = pattern(new Uint8Array(len), i + 1);
      model.set(d, off);
      ops.push(b.write(off, d));
    }
    await Promise.all(ops);
    const got = new Uint8Array(SIZE);
    await b.read(0, got);
    expect(firstDiff(got, model)).toBe(-1);
    await b.close();
    await g.close();
    await expectIdentical(path, model);
  });

  it('compressed writes through a backend are requests as any write: counted, marked, serialised', async () => {
    const path = join(dir, 'wc-generic.qcow2');
    await qemuImgCreate(path, SIZE, { o: 'cluster_size=64k' });
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    await g.add({ driver: 'qcow2', 'node-name': 'disk', file: { driver: 'file', filename: path } });
    const b = await g.createBackend('disk', { write: true });
    const bitmap = blockDirtyBitmapAdd(g, { node: 'disk', name: 'b0' });
    const cluster = new Uint8Array(65536).fill(0x5a);
    // A plain write over the same cluster at once: serialised, so one wins whole.
    const plain = new Uint8Array(65536).fill(0x33);
    await Promise.all([b.writeCompressed(131072, cluster), b.write(131072, plain)]);
    const got = new Uint8Array(65536);
    await b.read(131072, got);
    expect([0x5a, 0x33]).toContain(got[0]);
    expect(got.every((x) => x === got[0])).toBe(true);
    await b.writeCompressed(262144, cluster);
    expect(bitmap.count()).toBe(2 * 65536);
    expect(g.nodeStats('disk').counters('write')).toMatchObject({
      operations: 3,
      bytes: 3 * 65536,
    });
    // Out of bounds: refused as any write is, counted invalid.
    await expect(b.writeCompressed(SIZE, cluster)).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
    });
    await b.close();
    await g.close();
    const check = await run('qemu-img', ['check', path]);
    expect(check.stdout).toContain('No errors were found');
  });

  it('a dirty image with compressed clusters gets its refcounts rebuilt as qemu-img counts them', async () => {
    const { path, raw } = await compressed('dirty', 'cluster_size=16k,lazy_refcounts=on');
    // Mark it dirty: the read-write open rebuilds every refcount from L1/L2, and the result
    // must be exactly what qemu-img check expects (compressed clusters share host clusters).
    const f = await ImageFile.open(path);
    const h = await readHeader(f);
    h.incompatibleFeatures |= 1n;
    await f.write(serializeHeader(h), 0);
    const img = await openQcow2(f, { backing: null });
    expect(img.header.incompatibleFeatures & 1n).toBe(0n);
    const got = new Uint8Array(SIZE);
    await img.read(got, 0);
    expect(firstDiff(got, raw)).toBe(-1);
    await img.close();
    await f.close();
    await expectIdentical(path, raw);
  });
});

describe('qcow2 compressed writes', () => {
  const variants = [
    { name: 'zlib, 16k clusters', opts: 'cluster_size=16k' },
    { name: 'zstd, 64k clusters', opts: 'compression_type=zstd' },
    { name: 'refcount_bits=1 (no packing possible)', opts: 'cluster_size=16k,refcount_bits=1' },
    { name: 'extended L2', opts: 'extended_l2=on,cluster_size=32k' },
  ];
  for (const [vi, v] of variants.entries()) {
    it(`writeCompressed packs clusters that qemu-img reads back (${v.name})`, async () => {
      const path = join(dir, `wc${vi}.qcow2`);
      await qemuImgCreate(path, SIZE, { o: v.opts });
      const cs = JSON.parse(await must('qemu-img', ['info', '--output=json', path]))[
        'cluster-size'
      ] as number;
      const f = await ImageFile.open(path);
      const img = await openQcow2(f, { backing: null });
      const model = new Uint8Array(SIZE);
      const r = rng(vi + 70);
      const cluster = (seed: number) => {
        const d = new Uint8Array(cs);
        const k = seed % 3;
        if (k === 0) for (let j = 0; j < cs; j++) d[j] = (j % (7 + (seed % 5))) + seed;
        else if (k === 1)
          pattern(d, seed); // does not compress: written as a normal cluster
        else d.fill(seed & 0xff, 0, cs / 2);
        return d;
      };
      const ops: Promise<void>[] = [];
      for (let c = 0; c < SIZE / cs; c++) {
        if (r() < 0.3) continue;
        const d = cluster(c + 1);
        model.set(d, c * cs);
        ops.push(img.writeCompressed(d, c * cs));
      }
      await Promise.all(ops);
      // Overwrite some compressed clusters: partly (copy out), compressed again, discarded.
      for (let i = 0; i < 40; i++) {
        const c = Math.floor(r() * (SIZE / cs));
        const k = r();
        if (k < 0.4) {
          const d = pattern(new Uint8Array(1000), i);
          model.set(d, c * cs + 100);
          await img.write(d, c * cs + 100);
        } else if (k < 0.7) {
          const d = cluster(c + 1000 + i);
          model.set(d, c * cs);
          await img.writeCompressed(d, c * cs);
        } else {
          model.fill(0, c * cs, (c + 1) * cs);
          await img.discard(c * cs, cs);
        }
        if (i % 10 === 9) await img.flush();
      }
      const got = new Uint8Array(SIZE);
      await img.read(got, 0);
      expect(firstDiff(got, model)).toBe(-1);
      expect((await img.blockStatus(0, SIZE)).some((x) => x.compressed)).toBe(true);
      await img.close();
      await f.close();
      await expectIdentical(path, model);
      const f2 = await ImageFile.open(path, { readOnly: true });
      expect((await checkQcow2(f2)).messages).toEqual([]);
      await f2.close();
    });
  }
});

describe('cluster compression on the worker pool', () => {
  it('compresses shared and plain memory alike, leaving the caller its bytes', async () => {
    const cs = 64 * 1024;
    const plain = new Uint8Array(cs);
    for (let j = 0; j < cs; j++) plain[j] = (j % 13) * 7;
    // Shared memory (convert's buffers) goes to the worker without a copy; a view into the
    // middle of a larger buffer, as a window of convert's arena.
    const shared = new Uint8Array(new SharedArrayBuffer(3 * cs), cs, cs);
    shared.set(plain);
    const want = compressCluster(CompressionType.ZLIB, plain);
    const [fromShared, fromPlain] = await Promise.all([
      compressClusterAsync(CompressionType.ZLIB, shared),
      compressClusterAsync(CompressionType.ZLIB, plain),
    ]);
    expect(Buffer.from(fromShared).equals(Buffer.from(want))).toBe(true);
    expect(Buffer.from(fromPlain).equals(Buffer.from(want))).toBe(true);
    // Neither input was moved away (detached) nor changed.
    expect(plain.length).toBe(cs);
    expect(firstDiff(shared, plain)).toBe(-1);
    expect(firstDiff(decompressCluster(CompressionType.ZLIB, fromShared, cs), plain)).toBe(-1);
  });
});
