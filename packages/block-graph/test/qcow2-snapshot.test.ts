// Internal snapshots written by the qcow2 core: what it creates, applies and deletes is
// what qemu-img lists, checks clean and reads back (convert -l snapshot.name=...), and
// writes after a snapshot copy the shared clusters (L2 tables and data) instead of
// changing them under the snapshot.

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openQcow2, type Qcow2Image } from '../src/drivers/qcow2/image.ts';
import {
  applySnapshot,
  createSnapshot,
  deleteSnapshot,
  listSnapshots,
} from '../src/drivers/qcow2/snapshot.ts';
import { firstDiff, ImageFile, pattern } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

const SIZE = 4 << 20;

/** The disk as it should read: writes applied to a model of it too. */
class Disk {
  readonly model = new Uint8Array(SIZE);
  readonly image: Qcow2Image;
  constructor(image: Qcow2Image) {
    this.image = image;
  }
  async write(offset: number, length: number, seed: number): Promise<void> {
    const buf = new Uint8Array(length);
    pattern(buf, seed);
    await this.image.write(buf, offset);
    this.model.set(buf, offset);
  }
  async zero(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    await this.image.writeZeroes(offset, length, { mayUnmap });
    this.model.fill(0, offset, offset + length);
  }
  async discard(offset: number, length: number): Promise<void> {
    await this.image.discard(offset, length);
    this.model.fill(0, offset, offset + length);
  }
  async readsAsModel(): Promise<void> {
    const got = new Uint8Array(SIZE);
    await this.image.read(got, 0);
    expect(firstDiff(got, this.model)).toBe(-1);
  }
}

/** The disk of snapshot `name` (or the active one) as qemu-img reads it. */
async function qemuReads(path: string, name?: string): Promise<Uint8Array> {
  const out = join(dir, `read-${Math.random().toString(36).slice(2)}.raw`);
  const snap = name === undefined ? [] : ['-l', `snapshot.name=${name}`];
  await must('qemu-img', ['convert', '-U', ...snap, '-O', 'raw', path, out]);
  return new Uint8Array(await readFile(out));
}

async function expectClean(path: string): Promise<void> {
  const c = await run('qemu-img', ['check', path]);
  expect(c.stderr).toBe('');
  expect(c.stdout).toContain('No errors were found on the image.');
  expect(c.code).toBe(0);
}

describe.each([
  ['v3', 'compat=1.1'],
  ['v2', 'compat=0.10'],
  ['extended L2', 'extended_l2=on,cluster_size=64k'],
  ['lazy refcounts', 'lazy_refcounts=on'],
  ['refcount_bits=64, 4k clusters', 'refcount_bits=64,cluster_size=4k'],
])('qcow2 internal snapshots (%s)', (name, o) => {
  it('writes after a snapshot copy the shared clusters; apply and delete as QEMU', async () => {
    const path = join(dir, `${name.replace(/\W+/g, '-')}.qcow2`);
    await qemuImgCreate(path, SIZE, { o });
    await must('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x11 0 1M',
      '-c',
      'write -P 0x22 3M 192k',
      path,
    ]);
    const file = await ImageFile.open(path);
    const image = await openQcow2(file, { backing: null });
    const disk = new Disk(image);
    await image.read(disk.model, 0);

    await createSnapshot(image, { name: 's1' });
    const s1 = disk.model.slice();
    // Partial and whole clusters over shared data, a new cluster in a shared L2 table,
    // zeroes keeping and dropping their clusters, a discard.
    await disk.write(4096, 8192, 1);
    await disk.write(512 << 10, 128 << 10, 2);
    await disk.write(2 << 20, 64 << 10, 3);
    await disk.zero(3 << 20, 64 << 10, false);
    await disk.zero((3 << 20) + (64 << 10), 64 << 10, true);
    await disk.discard(896 << 10, 128 << 10);
    await disk.readsAsModel();
    await createSnapshot(image, { name: 's2' });
    const s2 = disk.model.slice();
    await disk.write(0, 64 << 10, 4);
    await image.flush();
    expect((await listSnapshots(image)).map((s) => [s.id, s.name])).toEqual([
      ['1', 's1'],
      ['2', 's2'],
    ]);
    await image.close();
    await expectClean(path);
    expect(firstDiff(await qemuReads(path, 's1'), s1)).toBe(-1);
    expect(firstDiff(await qemuReads(path, 's2'), s2)).toBe(-1);
    expect(firstDiff(await qemuReads(path), disk.model)).toBe(-1);
    const listed = await must('qemu-img', ['snapshot', '-l', path]);
    expect(listed).toMatch(/^1 +s1 +0 B /m);
    expect(listed).toMatch(/^2 +s2 +0 B /m);

    // Apply s1, write over it, delete s2: s1 stays as it was, the disk as written.
    const again = await openQcow2(file, { backing: null });
    const d2 = new Disk(again);
    await applySnapshot(again, { idOrName: 's1' });
    d2.model.set(s1);
    await d2.readsAsModel();
    await d2.write(0, 4096, 5);
    await deleteSnapshot(again, { name: 's2' });
    await d2.write(3 << 20, 64 << 10, 6);
    await again.close();
    await file.close();
    await expectClean(path);
    expect(firstDiff(await qemuReads(path, 's1'), s1)).toBe(-1);
    expect(firstDiff(await qemuReads(path), d2.model)).toBe(-1);
    expect(await must('qemu-img', ['snapshot', '-l', path])).not.toMatch(/s2/);
  });
});

describe('qcow2 internal snapshots made by QEMU', () => {
  it('are applied and deleted by the core, and written over with copy on write', async () => {
    const path = join(dir, 'theirs.qcow2');
    await qemuImgCreate(path, SIZE);
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 2M', path]);
    await must('qemu-img', ['snapshot', '-c', 'a', path]);
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x32 1M 2M', path]);
    await must('qemu-img', ['snapshot', '-c', 'b', path]);
    const a = await qemuReads(path, 'a');
    const file = await ImageFile.open(path);
    const image = await openQcow2(file, { backing: null });
    const disk = new Disk(image);
    await image.read(disk.model, 0);
    await disk.write(0, 4096, 7);
    await applySnapshot(image, { idOrName: '1' });
    disk.model.set(a);
    await disk.readsAsModel();
    await deleteSnapshot(image, { name: 'b' });
    await disk.write(1 << 20, 4096, 8);
    await image.close();
    await file.close();
    await expectClean(path);
    expect(firstDiff(await qemuReads(path, 'a'), a)).toBe(-1);
    expect(firstDiff(await qemuReads(path), disk.model)).toBe(-1);
    await must('qemu-img', ['snapshot', '-d', 'a', path]);
    await expectClean(path);
  });
});
