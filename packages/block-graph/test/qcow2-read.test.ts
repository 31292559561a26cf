// Reading images made by qemu-img / qemu-io, checked byte for byte against
// `qemu-img convert -O raw` of the same image, and block status against `qemu-img map`.

import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openQcow2, type Qcow2Image } from '../src/drivers/qcow2/image.ts';
import type { Qcow2BackingReader } from '../src/drivers/qcow2/types.ts';
import { firstDiff, ImageFile, pattern, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
const files: ImageFile[] = [];

afterAll(async () => {
  for (const f of files) await f.close();
  await cleanup();
});

async function openRO(
  path: string,
  backing: Qcow2BackingReader | null = null,
): Promise<Qcow2Image> {
  const f = await ImageFile.open(path, { readOnly: true });
  files.push(f);
  return openQcow2(f, { readOnly: true, backing });
}

/** Reads the whole image in pieces of odd sizes and compares with the raw conversion. */
async function expectSameAsQemu(img: Qcow2Image, path: string): Promise<void> {
  const rawPath = `${path}.raw`;
  await must('qemu-img', ['convert', '-O', 'raw', path, rawPath]);
  const want = new Uint8Array(await readFile(rawPath));
  expect(img.virtualSize).toBe(want.length);
  const got = new Uint8Array(img.virtualSize);
  const r = rng(img.virtualSize);
  const pending: Promise<void>[] = [];
  for (let off = 0; off < img.virtualSize; ) {
    const len = Math.min(img.virtualSize - off, 1 + Math.floor(r() * 200_000));
    pending.push(img.read(got.subarray(off, off + len), off));
    off += len;
  }
  await Promise.all(pending);
  expect(firstDiff(got, want)).toBe(-1);
  // Random small unaligned reads too.
  for (let i = 0; i < 200; i++) {
    const off = Math.floor(r() * (img.virtualSize - 1));
    const len = Math.min(img.virtualSize - off, 1 + Math.floor(r() * 9000));
    const b = new Uint8Array(len);
    await img.read(b, off);
    expect(firstDiff(b, want.subarray(off, off + len))).toBe(-1);
  }
}

/** qemu-io commands writing patterns, zeros and discards at unaligned places. */
function fillCommands(size: number, seed: number): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < 40; i++) {
    const off = Math.floor(r() * (size - 300_000));
    const len = 1 + Math.floor(r() * 250_000);
    const kind = r();
    const p = 1 + Math.floor(r() * 250);
    if (kind < 0.7) cmds.push('-c', `write -P ${p} ${off} ${len}`);
    else if (kind < 0.85) cmds.push('-c', `write -z ${off & ~511} ${len & ~511 || 512}`);
    else cmds.push('-c', `discard ${off & ~511} ${len & ~511 || 512}`);
  }
  return cmds;
}

const variants: Array<{ name: string; opts: string; size: number }> = [
  { name: 'v2 64k', opts: 'compat=0.10', size: 16 << 20 },
  { name: 'v3 64k', opts: 'compat=1.1', size: 16 << 20 },
  { name: 'v3 512B', opts: 'cluster_size=512', size: 4 << 20 },
  { name: 'v3 4k refcount_bits=1', opts: 'cluster_size=4096,refcount_bits=1', size: 8 << 20 },
  { name: 'v3 2M refcount_bits=64', opts: 'cluster_size=2M,refcount_bits=64', size: 16 << 20 },
  { name: 'v3 lazy refcounts', opts: 'lazy_refcounts=on', size: 16 << 20 },
  { name: 'v3 extended L2 64k', opts: 'extended_l2=on', size: 16 << 20 },
  { name: 'v3 extended L2 16k', opts: 'extended_l2=on,cluster_size=16k', size: 8 << 20 },
  { name: 'v2 512B', opts: 'compat=0.10,cluster_size=512', size: 2 << 20 },
];

describe('qcow2 read: images from qemu-img create filled by qemu-io', () => {
  for (const [i, v] of variants.entries()) {
    it(`${v.name} reads back exactly`, async () => {
      const path = join(dir, `v${i}.qcow2`);
      await qemuImgCreate(path, v.size, { o: v.opts });
      await must('qemu-io', ['-f', 'qcow2', ...fillCommands(v.size, i + 7), path]);
      const img = await openRO(path);
      await expectSameAsQemu(img, path);
      // Block status agrees with qemu-img map on where data is.
      const map = JSON.parse(await must('qemu-img', ['map', '--output=json', path])) as Array<{
        start: number;
        length: number;
        data: boolean;
        offset?: number;
      }>;
      const ext = await img.blockStatus(0, img.virtualSize);
      const dataOf = (xs: Array<{ start: number; length: number; host?: number | undefined }>) => {
        const out = new Map<number, number | undefined>();
        for (const x of xs)
          for (let o = x.start; o < x.start + x.length; o += 512)
            out.set(o, x.host === undefined ? undefined : x.host + (o - x.start));
        return out;
      };
      const ours = dataOf(
        ext
          .filter((x) => x.status === 'data')
          .map((x) => ({ start: x.offset, length: x.length, host: x.hostOffset })),
      );
      const theirs = dataOf(
        map
          .filter((m) => m.data)
          .map((m) => ({ start: m.start, length: m.length, host: m.offset })),
      );
      expect([...ours.entries()]).toEqual([...theirs.entries()]);
    });
  }

  it('refuses to read past nothing: a zero-size image opens', async () => {
    const path = join(dir, 'empty.qcow2');
    await qemuImgCreate(path, '0');
    const img = await openRO(path);
    expect(img.virtualSize).toBe(0);
    expect(await img.blockStatus(0, 0)).toEqual([]);
  });
});

describe('qcow2 read: compressed clusters', () => {
  for (const type of ['zlib', 'zstd']) {
    it(`qemu-img convert -c (${type}) reads exactly`, async () => {
      const size = 6 << 20;
      const raw = new Uint8Array(size);
      const r = rng(type.length);
      // Compressible runs, random data, zeros, text-like repeats.
      for (let off = 0; off < size; ) {
        const len = Math.min(size - off, 1000 + Math.floor(r() * 150_000));
        const k = r();
        if (k < 0.3) pattern(raw.subarray(off, off + len), off);
        else if (k < 0.6) raw.fill(Math.floor(r() * 256), off, off + len);
        else if (k < 0.8) for (let j = 0; j < len; j++) raw[off + j] = (j % 17) + 65;
        off += len;
      }
      const rawPath = join(dir, `c-${type}.raw`);
      const path = join(dir, `c-${type}.qcow2`);
      await writeFile(rawPath, raw);
      await must('qemu-img', [
        'convert',
        '-c',
        '-f',
        'raw',
        '-O',
        'qcow2',
        '-o',
        `compression_type=${type},cluster_size=65536`,
        rawPath,
        path,
      ]);
      const img = await openRO(path);
      const got = new Uint8Array(size);
      await img.read(got, 0);
      expect(firstDiff(got, raw)).toBe(-1);
      const ext = await img.blockStatus(0, size);
      expect(ext.some((x) => x.compressed)).toBe(true);
      // Unaligned reads inside compressed clusters.
      for (let i = 0; i < 100; i++) {
        const off = Math.floor(r() * (size - 10_000));
        const b = new Uint8Array(1 + Math.floor(r() * 9_000));
        await img.read(b, off);
        expect(firstDiff(b, raw.subarray(off, off + b.length))).toBe(-1);
      }
    });
  }
});

describe('qcow2 read: backing chains', () => {
  it('a three-image chain (raw base, qcow2 middle, qcow2 top) reads exactly', async () => {
    const base = join(dir, 'base.raw');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    await writeFile(base, pattern(new Uint8Array(6 << 20), 99)); // shorter than the top
    await qemuImgCreate(mid, 10 << 20, { backing: base });
    await must('qemu-io', ['-f', 'qcow2', ...fillCommands(10 << 20, 3), mid]);
    await qemuImgCreate(top, 12 << 20, {
      o: 'cluster_size=32k',
      backing: mid,
      backingFormat: 'qcow2',
    });
    await must('qemu-io', ['-f', 'qcow2', ...fillCommands(12 << 20, 4), top]);
    const baseFile = await ImageFile.open(base, { readOnly: true });
    files.push(baseFile);
    const baseReader: Qcow2BackingReader = {
      read: (b, o) => baseFile.read(b, o),
      size: () => baseFile.size(),
    };
    const midImg = await openRO(mid, baseReader);
    const topImg = await openRO(top, midImg);
    await expectSameAsQemu(topImg, top);
  });

  it('requires the backing to be given (or null) when the header names one', async () => {
    const base = join(dir, 'b2.qcow2');
    const top = join(dir, 't2.qcow2');
    await qemuImgCreate(base, '1M');
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 64k', base]);
    await qemuImgCreate(top, '1M', { backing: base, backingFormat: 'qcow2' });
    const f = await ImageFile.open(top, { readOnly: true });
    files.push(f);
    await expect(openQcow2(f, { readOnly: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_QCOW2_BAD_OPTION',
    });
    const img = await openQcow2(f, { readOnly: true, backing: null });
    expect(img.header.backingFile).toBe(base);
    expect(img.header.backingFormat).toBe('qcow2');
    const b = new Uint8Array(4096);
    await img.read(b, 0);
    expect(b.every((x) => x === 0)).toBe(true);
  });
});

describe('qcow2 read/write: host offsets beyond 2 and 4 GiB', () => {
  it('a 6 GiB image with preallocated metadata (sparse file)', async () => {
    const path = join(dir, 'big.qcow2');
    await qemuImgCreate(path, '6G', { o: 'preallocation=metadata' });
    const G = 2 ** 30;
    await must('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `write -P 0x77 ${2.5 * G + 123} 100k`,
      '-c',
      `write -P 0x78 ${5 * G + 999} 70k`,
      path,
    ]);
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    for (const [off, len, p] of [
      [2.5 * G + 123, 102400, 0x77],
      [5 * G + 999, 71680, 0x78],
    ] as const) {
      const b = new Uint8Array(len + 2);
      await img.read(b, off - 1);
      expect(b[0]).toBe(0);
      expect(b[len + 1]).toBe(0);
      expect(b.subarray(1, len + 1).every((x) => x === p)).toBe(true);
      const st = await img.blockStatus(off, len);
      expect(st[0]!.status).toBe('data');
      expect(st[0]!.hostOffset).toBeGreaterThan(2 * G);
    }
    await img.write(new Uint8Array(5000).fill(0x99), 4.5 * G + 7);
    await img.close();
    await f.close();
    const io = await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `read -P 0x99 ${4.5 * G + 7} 5000`,
      '-c',
      `read -P 0x78 ${5 * G + 999} 70k`,
      path,
    ]);
    expect(io.stdout).not.toContain('Pattern verification failed');
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
  });
});
