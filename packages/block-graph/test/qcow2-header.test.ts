// Header handling: unknown header extensions survive our rewrites, autoclear bits are
// cleared before writing, a dirty image (lazy refcounts) is repaired when opened read-write,
// and Qcow2Image.check() sees what qemu-img check sees.

import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkQcow2, readHeader } from '../src/drivers/qcow2/check.ts';
import { createQcow2 } from '../src/drivers/qcow2/create.ts';
import { ExtType, serializeHeader } from '../src/drivers/qcow2/header.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { firstDiff, ImageFile, pattern } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

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
    await qemuImgCreate(base, '1M');
    await qemuImgCreate(path, '1M', {
      o: 'lazy_refcounts=on',
      backing: base,
      backingFormat: 'qcow2',
    });
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

  it('checks images with internal snapshots (their tables counted) and reads them read-only', async () => {
    const path = join(dir, 'snap.qcow2');
    await qemuImgCreate(path, '4M');
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', path]);
    await must('qemu-img', ['snapshot', '-c', 'one', path]);
    await must('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 2 64k 64k',
      '-c',
      'write -P 3 3M 4k',
      path,
    ]);
    await must('qemu-img', ['snapshot', '-c', 'two', path]);
    await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 4 0 4k', path]);
    expect((await run('qemu-img', ['check', path])).code).toBe(0);
    const f = await ImageFile.open(path, { readOnly: true });
    const img = await openQcow2(f, { backing: null, readOnly: true });
    const c = await img.check();
    expect(c.messages).toEqual([]);
    expect(c.notChecked).toEqual([]);
    const b = new Uint8Array(8192);
    await img.read(b, 0);
    expect(b.subarray(0, 4096).every((x) => x === 4)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 1)).toBe(true);
    await img.close();
    // A snapshot's data cluster counted once too few is a corruption for us and for qemu-img.
    const h = await readHeader(f);
    await f.close();
    const raw = await ImageFile.open(path);
    const rt = new Uint8Array(8);
    await raw.read(rt, h.refcountTableOffset);
    const block = Number(new DataView(rt.buffer).getBigUint64(0));
    const shared = new Uint8Array(2);
    // Cluster 0 of the guest is in snapshot 'one' (shared with 'two'): find its host cluster.
    const snapL1 = new Uint8Array(8);
    const fixed = new Uint8Array(12);
    await raw.read(fixed, h.snapshotsOffset);
    await raw.read(snapL1, Number(new DataView(fixed.buffer).getBigUint64(0)));
    const l2off = Number(new DataView(snapL1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    const e = new Uint8Array(8);
    await raw.read(e, l2off + 16); // guest cluster 2: written before 'one', never since
    const host = Number(new DataView(e.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    await raw.read(shared, block + 2 * (host / 65536));
    const rc = (shared[0]! << 8) | shared[1]!;
    expect(rc).toBe(3); // active + two snapshots
    await raw.write(Uint8Array.of(0, 2), block + 2 * (host / 65536));
    const c2 = await checkQcow2(raw);
    await raw.close();
    expect(c2.corruptions).toBeGreaterThan(0);
    expect((await run('qemu-img', ['check', path])).code).toBe(2);
  });

  it('creates preallocated extended-L2 images over a backing file that still read through', async () => {
    const base = join(dir, 'pb.qcow2');
    await qemuImgCreate(base, '2M');
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
