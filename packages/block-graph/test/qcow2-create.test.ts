// Images made by createQcow2 pass `qemu-img check`, `qemu-img info` shows the options given,
// qemu-io can write and read them, and our driver reads what qemu-io wrote.

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createQcow2, type Qcow2CreateOptions } from '../src/drivers/qcow2/create.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { BlockGraph } from '../src/index.ts';
import { firstDiff, ImageFile } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

async function create(name: string, opts: Qcow2CreateOptions): Promise<string> {
  const path = join(dir, name);
  const f = await ImageFile.open(path, { create: true });
  const progress: number[] = [];
  await createQcow2(f, opts, (done, total) => {
    expect(done).toBeLessThanOrEqual(total + 2 ** 21);
    progress.push(done);
  });
  await f.close();
  expect(progress.length).toBeGreaterThan(0);
  return path;
}

interface Info {
  'virtual-size': number;
  'cluster-size': number;
  'actual-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { data: Record<string, unknown> };
}

const cases: Array<{ name: string; opts: Qcow2CreateOptions; expect: Record<string, unknown> }> = [
  {
    name: 'default',
    opts: { size: 64 << 20 },
    expect: { compat: '1.1', 'lazy-refcounts': false, 'refcount-bits': 16, 'extended-l2': false },
  },
  {
    name: 'compat 0.10',
    opts: { size: 64 << 20, compat: '0.10' },
    expect: { compat: '0.10', 'refcount-bits': 16 },
  },
  {
    name: 'lazy refcounts, 4k clusters',
    opts: { size: 32 << 20, clusterSize: 4096, lazyRefcounts: true },
    expect: { 'lazy-refcounts': true },
  },
  {
    name: 'extended L2, 128k clusters',
    opts: { size: 100 << 20, clusterSize: 131072, extendedL2: true },
    expect: { 'extended-l2': true },
  },
  {
    name: '512B clusters, refcount bits 1',
    opts: { size: 16 << 20, clusterSize: 512, refcountBits: 1 },
    expect: { 'refcount-bits': 1 },
  },
  {
    name: '2M clusters, refcount bits 64',
    opts: { size: 200 << 20, clusterSize: 2 << 20, refcountBits: 64 },
    expect: { 'refcount-bits': 64 },
  },
  {
    name: 'zstd compression type',
    opts: { size: 8 << 20, compressionType: 'zstd' },
    expect: { 'compression-type': 'zstd' },
  },
  { name: 'an empty disk', opts: { size: 0 }, expect: { compat: '1.1' } },
  {
    name: 'preallocation metadata',
    opts: { size: 20 << 20, preallocation: 'metadata' },
    expect: {},
  },
  {
    name: 'preallocation full, 512B clusters',
    opts: { size: 3 << 20, clusterSize: 512, preallocation: 'full' },
    expect: {},
  },
];

describe('createQcow2', () => {
  for (const [i, c] of cases.entries()) {
    it(`${c.name}: qemu-img check passes and info shows the options`, async () => {
      const path = await create(`c${i}.qcow2`, c.opts);
      const check = await run('qemu-img', ['check', '-f', 'qcow2', path]);
      expect(check.stdout).toContain('No errors were found');
      expect(check.code).toBe(0);
      const info = JSON.parse(await must('qemu-img', ['info', '--output=json', path])) as Info;
      expect(info['virtual-size']).toBe(c.opts.size);
      expect(info['cluster-size']).toBe(c.opts.clusterSize ?? 65536);
      expect(info['format-specific'].data).toMatchObject(c.expect);
      if (c.opts.preallocation) {
        const map = JSON.parse(await must('qemu-img', ['map', '--output=json', path])) as Array<{
          data: boolean;
          length: number;
        }>;
        const data = map.filter((m) => m.data).reduce((a, m) => a + m.length, 0);
        expect(data).toBe(c.opts.size);
      }
      if (c.opts.size === 0) return; // nothing to write on an empty disk
      // qemu-io writes to it; we read back what it wrote.
      await must('qemu-io', [
        '-f',
        'qcow2',
        '-c',
        'write -P 0x5c 4097 300000',
        '-c',
        'write -z 1M 64k',
        path,
      ]);
      expect((await run('qemu-img', ['check', '-f', 'qcow2', path])).code).toBe(0);
      await must('qemu-img', ['convert', '-O', 'raw', path, `${path}.raw`]);
      const want = new Uint8Array(await readFile(`${path}.raw`));
      const f = await ImageFile.open(path);
      const img = await openQcow2(f, { backing: null });
      const got = new Uint8Array(img.virtualSize);
      await img.read(got, 0);
      expect(firstDiff(got, want)).toBe(-1);
      await img.close();
      await f.close();
    });
  }

  it('with a backing file and format: info shows them and the chain reads through', async () => {
    const base = join(dir, 'base.qcow2');
    await qemuImgCreate(base, '4M');
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 4M', base]);
    const path = await create('over.qcow2', {
      size: 8 << 20,
      backingFile: 'base.qcow2',
      backingFormat: 'qcow2',
    });
    const info = JSON.parse(await must('qemu-img', ['info', '--output=json', path])) as Info;
    expect(info['backing-filename']).toBe('base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    // Through the graph, which opens the backing file the header names.
    const g = new BlockGraph();
    await g.add({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: path } });
    const disk = await g.createBackend('top', { write: true });
    const b = new Uint8Array(8 << 20);
    await disk.read(0, b);
    expect(b.subarray(0, 4 << 20).every((x) => x === 0x42)).toBe(true);
    expect(b.subarray(4 << 20).every((x) => x === 0)).toBe(true);
    await disk.write(65500, new Uint8Array(100).fill(1));
    await g.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    const io = await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'read -P 0x42 0 65500',
      '-c',
      'read -P 1 65500 100',
      '-c',
      'read -P 0x42 65600 100000',
      path,
    ]);
    expect(io.stdout).not.toContain('Pattern verification failed');
    expect(io.code).toBe(0);
  });

  it('refuses inconsistent options with a stable code', async () => {
    const f = await ImageFile.open(join(dir, 'bad.qcow2'), { create: true });
    const bad: Qcow2CreateOptions[] = [
      { size: 1000 },
      { size: 1 << 20, clusterSize: 3000 },
      { size: 1 << 20, clusterSize: 4 << 20 },
      { size: 1 << 20, compat: '0.10', lazyRefcounts: true },
      { size: 1 << 20, extendedL2: true, clusterSize: 8192 },
      { size: 1 << 20, refcountBits: 3 },
      { size: 1 << 20, backingFormat: 'raw' },
      { size: 1 << 20, backingFile: 'x', preallocation: 'metadata' },
    ];
    for (const o of bad) {
      await expect(createQcow2(f, o)).rejects.toMatchObject({
        code: 'ERR_VMDISK_BLOCK_QCOW2_BAD_OPTION',
      });
    }
    await f.close();
  });
});
