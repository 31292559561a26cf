// Header handling: unknown header extensions survive our rewrites, autoclear bits are
// cleared before writing, a dirty image (lazy refcounts) is repaired when opened read-write,
// and Qcow2Image.check() sees what qemu-img check sees.

import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readHeader } from '../src/drivers/qcow2/check.ts';
import { createQcow2 } from '../src/drivers/qcow2/create.ts';
import { ExtType, serializeHeader } from '../src/drivers/qcow2/header.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { firstDiff, ImageFile, must, pattern, run, tempDir } from './qcow2-helpers.ts';

let dir = '';
let cleanup: () => Promise<void> = async () => {};
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir());
});
afterAll(async () => {
  await cleanup();
});

async function rewriteHeader(
  path: string,
  edit: (h: Awaited<ReturnType<typeof readHeader>>) => void,
): Promise<void> {
  const f = await ImageFile.open(path);
  const h = await readHeader(f);
  edit(h);
  await f.write(serializeHeader(h), 0);
  await f.close();
}

describe('qcow2 header', () => {
  it('keeps unknown header extensions and the backing file name when it rewrites the header', async () => {
    const base = join(dir, 'hb.qcow2');
    const path = join(dir, 'h.qcow2');
    await must('qemu-img', ['create', '-f', 'qcow2', base, '1M']);
    await must('qemu-img', [
      'create',
      '-f',
      'qcow2',
      '-o',
      'lazy_refcounts=on',
      '-b',
      base,
      '-F',
      'qcow2',
      path,
      '1M',
    ]);
    const unknown = { type: 0x12345678, data: new TextEncoder().encode('kept across rewrites') };
    await rewriteHeader(path, (h) => {
      h.otherExtensions.push(unknown);
      h.autoclearFeatures = 1n << 5n; // an unknown autoclear bit: cleared before we write
    });
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null, lazyRefcounts: true });
    await img.write(new Uint8Array(100).fill(1), 0); // sets the dirty bit: header rewritten
    const dirty = await readHeader(f);
    expect(dirty.incompatibleFeatures & 1n).toBe(1n);
    await img.close(); // clears it: header rewritten again
    const h = await readHeader(f);
    await f.close();
    expect(h.incompatibleFeatures & 1n).toBe(0n);
    expect(h.autoclearFeatures).toBe(0n);
    expect(h.otherExtensions).toEqual([unknown]);
    expect(h.backingFile).toBe(base);
    expect(h.backingFormat).toBe('qcow2');
    expect(h.featureNames.some((x) => x.name === 'lazy refcounts')).toBe(true);
    const info = JSON.parse(await must('qemu-img', ['info', '--output=json', path]));
    expect(info['backing-filename']).toBe(base);
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    expect(ExtType.BACKING_FORMAT).toBe(0xe2792aca);
  });

  it('repairs a dirty image (lazy refcounts, never closed) on a read-write open', async () => {
    const path = join(dir, 'dirty.qcow2');
    const f = await ImageFile.open(path, { create: true });
    await createQcow2(f, { size: 8 << 20, clusterSize: 4096, lazyRefcounts: true });
    const img = await openQcow2(f, { backing: null });
    const data = pattern(new Uint8Array(3 << 20), 3);
    await img.write(data, 12345);
    await img.discard(1 << 20, 1 << 20);
    data.fill(0, (1 << 20) - 12345, (2 << 20) - 12345);
    await img.flush(); // L2 tables on disk, refcounts not (lazy): abandoned without close
    await f.close();
    const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-U', path]));
    expect(info['dirty-flag']).toBe(true);
    const f2 = await ImageFile.open(path);
    const ro = await openQcow2(f2, { backing: null, readOnly: true });
    expect((await ro.check()).corruptions).toBeGreaterThan(0); // stale refcounts on disk
    await ro.close();
    const rw = await openQcow2(f2, { backing: null });
    expect(rw.header.incompatibleFeatures & 1n).toBe(0n);
    const c = await rw.check();
    expect(c.messages).toEqual([]);
    const got = new Uint8Array(data.length);
    await rw.read(got, 12345);
    expect(firstDiff(got, data)).toBe(-1);
    await rw.close();
    await f2.close();
    const check = await run('qemu-img', ['check', path]);
    expect(check.stdout).toContain('No errors were found');
  });

  it('creates preallocated extended-L2 images over a backing file that still read through', async () => {
    const base = join(dir, 'pb.qcow2');
    await must('qemu-img', ['create', '-f', 'qcow2', base, '2M']);
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 0 2M', base]);
    const path = join(dir, 'p.qcow2');
    const f = await ImageFile.open(path, { create: true });
    await createQcow2(f, {
      size: 2 << 20,
      extendedL2: true,
      preallocation: 'metadata',
      backingFile: base,
      backingFormat: 'qcow2',
    });
    await f.close();
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x21 0 2M', path]);
    expect(io.stdout).not.toContain('Pattern verification failed');
    expect(io.code).toBe(0);
    const fh = await open(path, 'r');
    expect((await fh.stat()).size).toBeGreaterThanOrEqual(2 << 20);
    await fh.close();
  });
});
