// The qcow2 driver in the block graph (blockdev-add options as QEMU's), judged by qemu-img:
// reads of qemu-made images (compressed too, backing chains opened from the header), random
// I/O through a BlockBackend then `qemu-img check` and `qemu-img compare`, block status.

import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createQcow2 } from '../src/drivers/qcow2/create.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { qcow2Driver, qcow2FileOf } from '../src/drivers/qcow2/qcow2.ts';
import type { Qcow2File } from '../src/drivers/qcow2/types.ts';
import { BlockGraph } from '../src/index.ts';
import { firstDiff, pattern, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

async function rawOf(path: string): Promise<Uint8Array> {
  // -U: the graph still holds the image open.
  await must('qemu-img', ['convert', '-U', '-O', 'raw', path, `${path}.raw`]);
  return new Uint8Array(await readFile(`${path}.raw`));
}

async function openNode(options: Record<string, unknown>) {
  const g = new BlockGraph({ drivers: [qcow2Driver] });
  await g.add({ 'node-name': 'disk', discard: 'unmap', ...options });
  return g;
}

describe('qcow2 in the block graph', () => {
  it('reads a qemu-io filled image and a compressed one exactly', async () => {
    const path = join(dir, 'a.qcow2');
    await qemuImgCreate(path, '8M', { o: 'cluster_size=16k' });
    await must('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 3 5 300k',
      '-c',
      'write -z 1M 100k',
      '-c',
      'write -P 4 7M 1M',
      path,
    ]);
    const comp = join(dir, 'a-c.qcow2');
    await must('qemu-img', ['convert', '-c', '-O', 'qcow2', path, comp]);
    for (const p of [path, comp]) {
      const g = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: p } });
      const b = await g.createBackend('disk');
      const got = new Uint8Array(8 << 20);
      await b.read(0, got);
      expect(firstDiff(got, await rawOf(p))).toBe(-1);
      const part = new Uint8Array(5000);
      await b.read(7 * (1 << 20) - 100, part);
      expect(part.subarray(0, 100).every((x) => x === 0)).toBe(true);
      expect(part.subarray(100).every((x) => x === 4)).toBe(true);
      await b.close();
      await g.close();
    }
  });

  it('opens the backing chain its headers name (relative names, probed raw base) and reads through it', async () => {
    const base = join(dir, 'base.img');
    await writeFile(base, pattern(new Uint8Array(3 << 20), 5));
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    await qemuImgCreate(mid, '6M', { unsafe: true, backing: 'base.img' });
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 6 1M 1500k', mid]);
    await qemuImgCreate(top, '8M', {
      o: 'extended_l2=on',
      backing: 'mid.qcow2',
      backingFormat: 'qcow2',
    });
    await must('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 7 2M 10k',
      '-c',
      'write -P 8 5000 3000',
      top,
    ]);
    const g = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: top } });
    const b = await g.createBackend('disk', { write: true });
    const got = new Uint8Array(8 << 20);
    await b.read(0, got);
    expect(firstDiff(got, await rawOf(top))).toBe(-1);
    // A write into the middle of a cluster copies the rest from the chain below.
    await b.write(2 * (1 << 20) + 40_000, new Uint8Array(1000).fill(9));
    await b.close();
    await g.close();
    expect((await run('qemu-img', ['check', top])).code).toBe(0);
    const io = await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `read -P 6 ${2 * (1 << 20) + 10240} 29760`,
      '-c',
      `read -P 9 ${2 * (1 << 20) + 40_000} 1000`,
      top,
    ]);
    expect(io.stdout).not.toContain('Pattern verification failed');
    expect(io.code).toBe(0);
  });

  it('block status: data and zero clusters in this layer, the rest from the backing file', async () => {
    const base = join(dir, 'bs-base.img');
    await writeFile(base, pattern(new Uint8Array(1 << 20), 9));
    const top = join(dir, 'bs-top.qcow2');
    await qemuImgCreate(top, '2M', { backing: base });
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -z 64k 64k', top]);
    const g = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: top } });
    const b = await g.createBackend('disk');
    const ext = await b.blockStatus(0, 2 << 20);
    const at = (off: number) => {
      let pos = 0;
      for (const x of ext) {
        if (off < pos + x.length) return x;
        pos += x.length;
      }
      throw new Error(`no extent at ${off}`);
    };
    expect(at(0)).toMatchObject({ hole: false, zero: false, depth: 1 });
    expect(at(65536)).toMatchObject({ hole: true, zero: true, depth: 1 });
    expect(at(3 * 65536)).toMatchObject({ hole: false, depth: 2 });
    expect(at((1 << 20) + 4096)).toMatchObject({ hole: true, zero: true, depth: 0 });
    await b.close();
    await g.close();
  });

  it('many concurrent partial writes into the same unallocated clusters over a backing file', async () => {
    const base = join(dir, 'cc-base.img');
    const basePattern = pattern(new Uint8Array(1 << 20), 77);
    await writeFile(base, basePattern);
    const top = join(dir, 'cc-top.qcow2');
    await qemuImgCreate(top, '1M', { o: 'cluster_size=16k', backing: base });
    const g = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: top } });
    const b = await g.createBackend('disk', { write: true });
    const model = basePattern.slice();
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) {
      const off = ((i * 29) % 64) * 1000 + 7; // 64 KiB: four clusters, 16 writes each
      const d = pattern(new Uint8Array(900), i + 1);
      model.set(d, off);
      ops.push(b.write(off, d));
    }
    await Promise.all(ops);
    const got = new Uint8Array(1 << 20);
    await b.read(0, got);
    expect(firstDiff(got, model)).toBe(-1);
    await b.close();
    await g.close();
    expect((await run('qemu-img', ['check', top])).code).toBe(0);
    const rawPath = join(dir, 'cc.raw');
    await writeFile(rawPath, model);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', top, rawPath]);
    expect(cmp.stdout).toContain('Images are identical');
  });

  it("'backing': null opens without the backing file", async () => {
    const base = join(dir, 'nb-base.qcow2');
    const top = join(dir, 'nb-top.qcow2');
    await qemuImgCreate(base, '1M');
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', base]);
    await qemuImgCreate(top, '1M', { backing: base, backingFormat: 'qcow2' });
    const g = await openNode({
      driver: 'qcow2',
      backing: null,
      file: { driver: 'file', filename: top },
    });
    const b = await g.createBackend('disk');
    const got = new Uint8Array(4096);
    await b.read(0, got);
    expect(got.every((x) => x === 0)).toBe(true);
    await b.close();
    await g.close();
  });

  it('creates an image on a file node of the graph (as a blockdev-create job would), then opens it', async () => {
    const path = join(dir, 'created.qcow2');
    await writeFile(path, new Uint8Array(0));
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    const fileNode = await g.add({ driver: 'file', 'node-name': 'proto', filename: path });
    const holder = await g.createBackend('proto', { perm: ['consistent-read', 'write', 'resize'] });
    await createQcow2(qcow2FileOf(fileNode), {
      size: 3 << 20,
      clusterSize: 32768,
      lazyRefcounts: true,
    });
    await holder.close();
    await g.add({ driver: 'qcow2', 'node-name': 'disk', file: 'proto' });
    const b = await g.createBackend('disk', { write: true });
    await b.write(40_000, new Uint8Array(70_000).fill(0x3c));
    await b.close();
    await g.close();
    const info = JSON.parse(await must('qemu-img', ['info', '--output=json', path]));
    expect(info['cluster-size']).toBe(32768);
    expect(info['format-specific'].data['lazy-refcounts']).toBe(true);
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    const io = await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'read -P 0x3c 40000 70000',
      '-c',
      'read -P 0 0 40000',
      path,
    ]);
    expect(io.stdout).not.toContain('Pattern verification failed');
  });

  it('takes cache-size, l2-cache-size and refcount-cache-size as QEMU does', async () => {
    const path = join(dir, 'cache.qcow2');
    await qemuImgCreate(path, '64M');
    const file = { driver: 'file', filename: path };
    for (const opts of [
      { 'cache-size': 1 << 20 },
      { 'cache-size': 1 << 20, 'l2-cache-size': 65536 },
      { 'l2-cache-size': 131072 },
    ]) {
      const g = new BlockGraph({ drivers: [qcow2Driver] });
      await g.add({ driver: 'qcow2', 'node-name': 'disk', file, ...opts });
      const b = await g.createBackend('disk', { write: true });
      await b.write(1 << 20, new Uint8Array(4096).fill(1));
      await b.close();
      await g.close();
    }
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    await expect(
      g.add({
        driver: 'qcow2',
        file,
        'cache-size': 65536,
        'l2-cache-size': 65536,
        'refcount-cache-size': 65536,
      }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'cache-size' });
    await expect(g.add({ driver: 'qcow2', file, 'cache-size': 'big' })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_OPTION',
    });
    await g.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });

  it('rejects lazy-refcounts on a compat=0.10 image as a bad option', async () => {
    const path = join(dir, 'v2.qcow2');
    await qemuImgCreate(path, '1M', { o: 'compat=0.10' });
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    await expect(
      g.add({ driver: 'qcow2', 'lazy-refcounts': true, file: { driver: 'file', filename: path } }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_OPTION',
    });
    await g.close();
  });

  const variants = [
    {
      name: 'v3 64k, small L2 cache',
      opts: 'compat=1.1',
      backing: false,
      extra: { 'l2-cache-size': 131072 },
    },
    {
      name: 'v3 extended L2 over a backing file',
      opts: 'extended_l2=on',
      backing: true,
      extra: {},
    },
    {
      name: 'v2 16k over a backing file',
      opts: 'compat=0.10,cluster_size=16k',
      backing: true,
      extra: {},
    },
    {
      name: 'v3 lazy refcounts 4k',
      opts: 'lazy_refcounts=on,cluster_size=4k',
      backing: false,
      extra: {},
    },
    {
      name: 'v3 16k, O_DIRECT (cache.direct)',
      opts: 'cluster_size=16k',
      backing: false,
      extra: { cache: { direct: true } },
    },
  ];
  for (const [vi, v] of variants.entries()) {
    it(`random I/O through a backend (${v.name}): qemu-img check clean, compare identical`, async () => {
      const size = 12 << 20;
      const path = join(dir, `r${vi}.qcow2`);
      const model = new Uint8Array(size);
      let base: Uint8Array | null = null;
      if (v.backing) {
        const bp = join(dir, `r${vi}.base`);
        base = pattern(new Uint8Array(size - (2 << 20)), vi + 50);
        model.set(base);
        await writeFile(bp, base);
        await qemuImgCreate(path, size, { o: v.opts, backing: bp });
      } else await qemuImgCreate(path, size, { o: v.opts });
      const cs = JSON.parse(await must('qemu-img', ['info', '--output=json', path]))[
        'cluster-size'
      ] as number;
      const unit = v.opts.includes('extended_l2') ? cs / 32 : cs;
      const v3 = !v.opts.includes('0.10');
      const g = await openNode({
        driver: 'qcow2',
        file: { driver: 'file', filename: path },
        ...v.extra,
      });
      const b = await g.createBackend('disk', { write: true });
      const r = rng(vi + 1000);
      for (let batchNo = 0; batchNo < 60; batchNo++) {
        const taken: Array<[number, number]> = [];
        const ops: Promise<void>[] = [];
        for (let k = 0; k < 16; k++) {
          const len = 1 + Math.floor(r() * (r() < 0.7 ? 9000 : 200_000));
          const off = Math.floor(r() * (size - len));
          if (taken.some(([a, c]) => off < c && a < off + len)) continue;
          taken.push([off, off + len]);
          const x = r();
          if (x < 0.65) {
            const d = pattern(new Uint8Array(len), batchNo * 100 + k);
            model.set(d, off);
            ops.push(b.write(off, d));
          } else if (x < 0.85) {
            model.fill(0, off, off + len);
            ops.push(b.writeZeroes(off, len, { noHole: r() < 0.5 }));
          } else {
            const a = Math.ceil(off / unit) * unit;
            const e = Math.floor((off + len) / unit) * unit;
            for (let u = a; u < e; u += unit) {
              if (unit === cs || v.opts.includes('extended_l2')) {
                if (!v3 && base) {
                  model.fill(0, u, u + unit);
                  model.set(
                    base.subarray(Math.min(u, base.length), Math.min(u + unit, base.length)),
                    u,
                  );
                } else model.fill(0, u, u + unit);
              }
            }
            ops.push(b.trim(off, len));
          }
        }
        await Promise.all(ops);
        if (batchNo % 10 === 9) await b.flush();
      }
      const got = new Uint8Array(size);
      await b.read(0, got);
      expect(firstDiff(got, model)).toBe(-1);
      // Block status: depth 1 wherever this layer has data.
      const ext = await b.blockStatus(0, size);
      expect(ext.reduce((a, x) => a + x.length, 0)).toBeGreaterThan(0);
      expect(ext.some((x) => x.depth === 1 && !x.hole)).toBe(true);
      await b.close();
      await g.close();
      const check = await run('qemu-img', ['check', path]);
      expect(check.stdout).toContain('No errors were found');
      const rawPath = join(dir, `r${vi}.raw`);
      await writeFile(rawPath, model);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, rawPath]);
      expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    });
  }
});

describe('qcow2 I/O buffers under cache.direct=on', () => {
  it('L2 tables, refcount blocks, their write-back snapshots and copy-on-write units come from the node allocator', async () => {
    const path = join(dir, 'direct-buffers.qcow2');
    const cs = 65536;
    await qemuImgCreate(path, '64M');
    const g = new BlockGraph({ drivers: [qcow2Driver] });
    const fileNode = await g.add({
      driver: 'file',
      'node-name': 'proto',
      filename: path,
      cache: { direct: true },
    });
    const holder = await g.createBackend('proto', { perm: ['consistent-read', 'write', 'resize'] });
    // The node as the qcow2 driver sees its file, noting each cluster-sized (or larger)
    // buffer that did not come from the node's allocator: the file driver bounces those.
    const inner = qcow2FileOf(fileNode);
    const allocated = new WeakSet<ArrayBufferLike>();
    const foreign: string[] = [];
    const note = (op: string, buf: Uint8Array, offset: number) => {
      if (buf.byteLength >= cs && !allocated.has(buf.buffer))
        foreign.push(`${op} ${buf.byteLength} at ${offset}`);
    };
    const file: Qcow2File = {
      ...inner,
      read: (buf, offset) => {
        note('read', buf, offset);
        return inner.read(buf, offset);
      },
      write: (buf, offset) => {
        note('write', buf, offset);
        return inner.write(buf, offset);
      },
      allocBuffer: (length) => {
        const buf = inner.allocBuffer!(length);
        allocated.add(buf.buffer);
        return buf;
      },
    };
    const img = await openQcow2(file, { backing: null });
    // New L2 tables and refcount blocks, partial clusters (copy-on-write units), in place.
    // (Guest data comes from the allocator as well, as the NBD server's and backends' do.)
    const whole = file.allocBuffer!(cs);
    for (let i = 0; i < 8; i++) {
      await img.write(pattern(new Uint8Array(5000), i), i * 9 * cs + 700);
      await img.write(pattern(whole, 100 + i), i * 9 * cs + 3 * cs);
      await img.flush();
    }
    file.releaseBuffer!(whole);
    await img.writeZeroes(2 * cs, cs);
    const back = new Uint8Array(5000);
    await img.read(back, 700);
    expect(firstDiff(back, pattern(new Uint8Array(5000), 0))).toBe(-1);
    await img.close();
    await holder.close();
    await g.close();
    expect(foreign).toEqual([]);
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });
});
