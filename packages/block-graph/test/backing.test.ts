import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { cowFormat } from './cow-format.ts';
import { pattern, tempDir, writeFile } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

const MiB = 1 << 20;
const CS = 65536;

/** base: 2 MiB raw file with data, a hole in [512 KiB, 1 MiB); top: 4 MiB test-cow over it. */
async function chain(copyOnRead = false) {
  const basePath = tmp.path(`base-${Math.random()}.img`);
  writeFile(basePath, pattern(1, 0, 2 * MiB));
  const topPath = tmp.path(`top-${Math.random()}.img`);
  writeFile(topPath, Buffer.alloc(0));
  const g = new BlockGraph({ drivers: [cowFormat] });
  await g.add({
    driver: 'raw',
    'node-name': 'base',
    discard: 'unmap',
    file: { driver: 'file', filename: basePath },
  });
  const baseB = await g.createBackend('base', { write: true, shareWrite: true });
  await baseB.trim(512 * 1024, 512 * 1024);
  await baseB.close();
  await g.add({
    driver: 'test-cow',
    'node-name': 'top',
    size: 4 * MiB,
    file: { driver: 'file', filename: topPath },
    backing: 'base',
  });
  if (copyOnRead) await g.add({ driver: 'copy-on-read', 'node-name': 'cor', file: 'top' });
  const b = await g.createBackend(copyOnRead ? 'cor' : 'top', { write: true });
  const expected = pattern(1, 0, 2 * MiB);
  expected.fill(0, 512 * 1024, MiB);
  const full = Buffer.concat([expected, Buffer.alloc(2 * MiB)]);
  return { g, b, expected: full };
}

describe('backing chain', () => {
  it('reads fall through to the backing node, zeros past its end', async () => {
    const { g, b, expected } = await chain();
    const out = Buffer.alloc(4 * MiB);
    await b.read(0, out);
    expect(Buffer.compare(out, expected)).toBe(0);
    await g.close();
  });

  it('a partial write into an unallocated cluster copies the rest of the cluster from below', async () => {
    const { g, b, expected } = await chain();
    const writes: [number, number][] = [
      [100, 10],
      [CS - 5, 10],
      [3 * MiB - 100, 200],
      [600 * 1024 + 3, 4000],
    ];
    for (const [off, len] of writes) {
      const data = pattern(2, off, len);
      await b.write(off, data);
      data.copy(expected, off);
    }
    const out = Buffer.alloc(4 * MiB);
    await b.read(0, out);
    expect(Buffer.compare(out, expected)).toBe(0);
    // Clusters 0, 1, 9, 47 and 48 were allocated, each once.
    const top = g.query().find((n) => n['node-name'] === 'top')!;
    expect(top.allocated).toBe(5);
    expect(top.allocations).toBe(5);
    await g.close();
  });

  it('concurrent writes into one unallocated cluster allocate it once and lose nothing', async () => {
    const { g, b, expected } = await chain();
    await Promise.all(
      Array.from({ length: 64 }, (_, i) => {
        const data = pattern(3, i * 1000, 700);
        data.copy(expected, i * 1000);
        return b.write(i * 1000, data);
      }),
    );
    const out = Buffer.alloc(MiB);
    await b.read(0, out);
    expect(Buffer.compare(out, expected.subarray(0, MiB))).toBe(0);
    expect(g.query().find((n) => n['node-name'] === 'top')!.allocations).toBe(1);
    await g.close();
  });

  it('block status is merged along the chain with depth', async () => {
    const { g, b } = await chain();
    await b.write(0, pattern(4, 0, 2 * CS));
    await b.write(MiB + CS, pattern(4, 0, 100));
    const ext = await b.blockStatus(0, 4 * MiB);
    expect(ext).toEqual([
      { length: 2 * CS, hole: false, zero: false, depth: 1 }, // top
      { length: 512 * 1024 - 2 * CS, hole: false, zero: false, depth: 2 }, // base data
      { length: 512 * 1024, hole: true, zero: true, depth: 2 }, // base's file hole
      { length: CS, hole: false, zero: false, depth: 2 },
      { length: CS, hole: false, zero: false, depth: 1 },
      { length: MiB - 2 * CS, hole: false, zero: false, depth: 2 },
      { length: 2 * MiB, hole: true, zero: true, depth: 0 }, // past the backing's end
    ]);
    // Zero clusters in the top layer read as zeros and hide the backing.
    await b.writeZeroes(MiB + 2 * CS, CS);
    const z = await b.blockStatus(MiB + 2 * CS, CS);
    expect(z).toEqual([{ length: CS, hole: true, zero: true, depth: 1 }]);
    const out = Buffer.alloc(CS, 1);
    await b.read(MiB + 2 * CS, out);
    expect(out.every((x) => x === 0)).toBe(true);
    // A partial write into a zero cluster fills the rest with zeros, not backing data.
    await b.write(MiB + 2 * CS + 10, Buffer.alloc(10, 7));
    await b.read(MiB + 2 * CS, out);
    expect(out.subarray(10, 20).every((x) => x === 7)).toBe(true);
    expect(
      out.subarray(0, 10).every((x) => x === 0) && out.subarray(20).every((x) => x === 0),
    ).toBe(true);
    await g.close();
  });

  it('write-zeroes where the backing has data writes real zeros; fast zero refuses; whole clusters go to metadata', async () => {
    const { g, b } = await chain();
    // Not whole clusters: the generic layer writes zero buffers (allocating, copy on write).
    await b.writeZeroes(100, 1000);
    const out = Buffer.alloc(2000);
    await b.read(0, out);
    expect(Buffer.compare(out.subarray(100, 1100), Buffer.alloc(1000))).toBe(0);
    expect(Buffer.compare(out.subarray(0, 100), pattern(1, 0, 100))).toBe(0);
    expect(Buffer.compare(out.subarray(1100), pattern(1, 1100, 900))).toBe(0);
    await expect(b.writeZeroes(3 * CS + 1, 100, { fastZero: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_NOT_SUPPORTED',
      errnoName: 'ENOTSUP',
    });
    // Whole clusters become zero clusters in the metadata: nothing allocated.
    const allocated = g.query().find((n) => n['node-name'] === 'top')!.allocated;
    await b.writeZeroes(4 * CS, 2 * CS);
    expect(g.query().find((n) => n['node-name'] === 'top')!.allocated).toBe(allocated);
    expect(await b.blockStatus(4 * CS, 2 * CS)).toEqual([
      { length: 2 * CS, hole: true, zero: true, depth: 1 },
    ]);
    await g.close();
  });

  it('copy-on-read copies what a read finds in the backing into the top layer', async () => {
    const { g, b, expected } = await chain(true);
    const before = await b.blockStatus(0, MiB);
    expect(before.every((e) => e.depth === 2)).toBe(true);
    const out = Buffer.alloc(300 * 1024);
    await b.read(50 * 1024, out);
    expect(Buffer.compare(out, expected.subarray(50 * 1024, 350 * 1024))).toBe(0);
    const after = await b.blockStatus(0, MiB);
    expect(after[0]).toEqual({ length: 6 * CS, hole: false, zero: false, depth: 1 });
    const info = g.query().find((n) => n['node-name'] === 'cor')!;
    expect(info['copied-bytes']).toBe(300 * 1024);
    // A second read of the same range copies nothing more and reads the same bytes.
    await b.read(50 * 1024, out);
    expect(g.query().find((n) => n['node-name'] === 'cor')!['copied-bytes']).toBe(300 * 1024);
    expect(Buffer.compare(out, expected.subarray(50 * 1024, 350 * 1024))).toBe(0);
    // Guest writes racing copy-on-reads of the same range are never overwritten.
    const writes: Promise<void>[] = [];
    const reads: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) {
      const off = MiB + i * 8192;
      reads.push(b.read(off, Buffer.alloc(8192)));
      const data = pattern(9, off, 100);
      data.copy(expected, off);
      writes.push(b.write(off, data));
    }
    await Promise.all([...reads, ...writes]);
    const check = Buffer.alloc(32 * 8192);
    await b.read(MiB, check);
    expect(Buffer.compare(check, expected.subarray(MiB, MiB + 32 * 8192))).toBe(0);
    await g.close();
  });

  it('a format opens the backing file it names itself (openChild), owned by it', async () => {
    const basePath = tmp.file('named-base.img', pattern(5, 0, MiB));
    const topPath = tmp.file('named-top.img', Buffer.alloc(0));
    const g = new BlockGraph({ drivers: [cowFormat] });
    await g.add({
      driver: 'test-cow',
      'node-name': 'top',
      size: 2 * MiB,
      'backing-file': basePath,
      file: { driver: 'file', filename: topPath },
    });
    const top = g.query().find((n) => n['node-name'] === 'top')!;
    const backing = top.children.find((c) => c.child === 'backing')!;
    expect(backing.role).toEqual(['cow']);
    const base = g.query().find((n) => n['node-name'] === backing['node-name'])!;
    expect(base['read-only']).toBe(true);
    expect(base.refcount).toBe(1);
    const b = await g.createBackend('top', { write: true });
    const perms = g
      .query()
      .find((n) => n['node-name'] === 'top')!
      .children.find((c) => c.child === 'backing')!;
    expect(perms.perm).toEqual(['consistent-read']);
    expect(perms.shared).not.toContain('write');
    const out = Buffer.alloc(2 * MiB);
    await b.read(0, out);
    expect(Buffer.compare(out.subarray(0, MiB), pattern(5, 0, MiB))).toBe(0);
    expect(out.subarray(MiB).every((x) => x === 0)).toBe(true);
    await b.close();
    await g.close();
    expect(g.query()).toEqual([]);
  });

  it('a second format may not take a file whose metadata another format owns', async () => {
    const g = new BlockGraph({ drivers: [cowFormat] });
    writeFile(tmp.path('shared.img'), Buffer.alloc(0));
    await g.add({ driver: 'file', 'node-name': 'f', filename: tmp.path('shared.img') });
    await g.add({ driver: 'test-cow', 'node-name': 'one', size: MiB, file: 'f' });
    const err = await g
      .add({ driver: 'test-cow', 'node-name': 'two', size: MiB, file: 'f' })
      .catch((e) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT' });
    expect(err.message).toMatch(/by node 'one' \(uses node 'f' as 'file' child\)/);
    expect(g.hasNode('two')).toBe(false);
    // Even read-only: a reader of metadata shares no writes, and 'one' writes.
    const ro = await g
      .add({ driver: 'test-cow', 'node-name': 'three', 'read-only': true, size: MiB, file: 'f' })
      .catch((e) => e);
    expect(ro).toMatchObject({ code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT' });
    expect(g.query().find((n) => n['node-name'] === 'f')!.refcount).toBe(2);
    // Once 'one' is gone, a read-only one and a raw reader can share the file.
    await g.del('one');
    await g.add({
      driver: 'test-cow',
      'node-name': 'three',
      'read-only': true,
      size: MiB,
      file: 'f',
    });
    await g.add({ driver: 'raw', 'node-name': 'peek', 'read-only': true, file: 'f' });
    expect(g.query().find((n) => n['node-name'] === 'f')!.refcount).toBe(3);
    await g.close();
  });
});
