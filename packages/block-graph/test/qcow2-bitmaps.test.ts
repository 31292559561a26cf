// Persistent dirty bitmaps in qcow2 (the bitmaps extension) with QEMU as the peer: bitmaps
// QEMU wrote are loaded with their bits; bitmaps we write are listed by qemu-img info,
// leave qemu-img check clean and carry the same bits for QEMU (qemu-nbd exports them as
// qemu:dirty-bitmap:NAME, nbdinfo maps them); an image open read-write has them in use.
import { execFileSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { qemuDirtyExtents, qemuImgBitmaps } from '../../../tools/test-support/src/index.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { BlockGraph, blockDirtyBitmapAdd, blockDirtyBitmapRemove } from '../src/index.ts';
import type { BlockNode } from '../src/node.ts';
import { pattern, qemuImg, tempDir } from './helpers.ts';
import { ImageFile } from './qcow2-helpers.ts';

const KiB = 1024;
const MiB = 1 << 20;
const tmp = tempDir();
afterAll(() => tmp.cleanup());

const qemuIo = (img: string, ...cmds: string[]) =>
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img]);

const infoBitmaps = qemuImgBitmaps;
const qemuDirty = qemuDirtyExtents;

function check(img: string): void {
  qemuImg('check', '-q', '-U', img); // throws on any problem
}

/** Our own check agrees: the bitmaps' clusters are counted (no leaks, nothing unchecked). */
async function ourCheck(img: string): Promise<void> {
  const f = await ImageFile.open(img, { readOnly: true });
  try {
    const c = await (await openQcow2(f, { backing: null, readOnly: true })).check();
    expect(c.messages).toEqual([]);
    expect(c.notChecked).toEqual([]);
  } finally {
    await f.close();
  }
}

async function open(
  img: string,
  readOnly = false,
  locking = 'on',
): Promise<{ g: BlockGraph; node: BlockNode }> {
  const g = new BlockGraph();
  await g.add({
    driver: 'qcow2',
    'node-name': 'n',
    'read-only': readOnly,
    file: { driver: 'file', filename: img, locking },
  });
  return { g, node: g.node('n') as unknown as BlockNode };
}

describe('qcow2 persistent dirty bitmaps', () => {
  it('loads what QEMU stored: bits, granularity, recording; in use while open', async () => {
    const img = tmp.path('from-qemu.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuImg('bitmap', '--add', '-g', '4096', img, 'small');
    qemuImg('bitmap', '--add', img, 'big');
    qemuImg('bitmap', '--add', '--disable', img, 'off');
    qemuIo(img, 'write 0 4k', 'write 1M 100k', 'write -z 5M 64k');
    const { g, node } = await open(img);
    const byName = (n: string) => node.findDirtyBitmap(n)!;
    expect([...byName('small').dirtyRanges()]).toEqual([
      { offset: 0, length: 4 * KiB },
      { offset: MiB, length: 100 * KiB },
      { offset: 5 * MiB, length: 64 * KiB },
    ]);
    expect(byName('small').granularity).toBe(4096);
    expect(byName('big').count()).toBe(4 * 64 * KiB);
    expect(byName('off').count()).toBe(0);
    expect(byName('off').enabled).toBe(false);
    expect(byName('big').persistent).toBe(true);
    expect((await infoBitmaps(img))!.map((b) => b.flags)).toEqual([
      ['in-use', 'auto'],
      ['in-use', 'auto'],
      ['in-use'],
    ]);
    // A write through us lands in the bitmaps, and QEMU reads it after close.
    const b = await g.createBackend('n', { write: true });
    await b.write(7 * MiB, pattern(1, 0, 512));
    await b.close();
    await g.close();
    expect((await infoBitmaps(img))!.map((x) => x.flags)).toEqual([['auto'], ['auto'], []]);
    check(img);
    expect(await qemuDirty(img, 'small')).toEqual([
      { offset: 0, length: 4 * KiB },
      { offset: MiB, length: 100 * KiB },
      { offset: 5 * MiB, length: 64 * KiB },
      { offset: 7 * MiB, length: 4 * KiB },
    ]);
  }, 30_000);

  it('stores what we add; QEMU lists it and reads the same bits; remove drops it', async () => {
    const img = tmp.path('ours.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
    let { g } = await open(img);
    blockDirtyBitmapAdd(g, { node: 'n', name: 'b0', persistent: true });
    blockDirtyBitmapAdd(g, { node: 'n', name: 'fine', persistent: true, granularity: 512 });
    blockDirtyBitmapAdd(g, { node: 'n', name: 'mem' });
    blockDirtyBitmapAdd(g, { node: 'n', name: 'stopped', persistent: true, disabled: true });
    const b = await g.createBackend('n', { write: true });
    await b.write(0, pattern(2, 0, 1536));
    await b.write(40 * MiB + 512, pattern(3, 0, 512));
    await b.writeZeroes(63 * MiB, MiB);
    await b.close();
    await g.close();
    check(img);
    // New bitmaps are stored newest first, as QEMU stores them.
    expect(await infoBitmaps(img)).toEqual([
      { name: 'stopped', granularity: 65536, flags: [] },
      { name: 'fine', granularity: 512, flags: ['auto'] },
      { name: 'b0', granularity: 65536, flags: ['auto'] },
    ]);
    expect(await qemuDirty(img, 'fine')).toEqual([
      { offset: 0, length: 1536 },
      { offset: 40 * MiB + 512, length: 512 },
      { offset: 63 * MiB, length: MiB },
    ]);
    expect(await qemuDirty(img, 'b0')).toEqual([
      { offset: 0, length: 64 * KiB },
      { offset: 40 * MiB, length: 64 * KiB },
      { offset: 63 * MiB, length: MiB },
    ]);
    expect(await qemuDirty(img, 'stopped')).toEqual([]);
    await ourCheck(img);
    // Reopened: loaded again; stored again over the old clusters (check stays clean).
    ({ g } = await open(img));
    await blockDirtyBitmapRemove(g, 'n', 'fine');
    expect((await infoBitmaps(img))!.map((x) => x.name)).toEqual(['stopped', 'b0']);
    check(img);
    await g.close();
    check(img);
    ({ g } = await open(img));
    await blockDirtyBitmapRemove(g, 'n', 'b0');
    await blockDirtyBitmapRemove(g, 'n', 'stopped');
    await g.close();
    expect(await infoBitmaps(img)).toBeUndefined();
    check(img);
  }, 30_000);

  it('a bitmap of several clusters of data (a table of many entries) goes both ways', async () => {
    const img = tmp.path('big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '1G');
    // 512-byte granules: a cluster of bitmap data covers 256 MiB of disk, four in all.
    qemuImg('bitmap', '--add', '-g', '512', img, 'fine');
    qemuIo(img, 'write 300M 1k');
    let { g } = await open(img);
    const b = await g.createBackend('n', { write: true });
    await b.write(0, pattern(4, 0, 512));
    await b.write(700 * MiB, pattern(5, 0, 4 * KiB));
    await b.write(1024 * MiB - 512, pattern(6, 0, 512));
    await b.close();
    await g.close();
    check(img);
    await ourCheck(img);
    const expected = [
      { offset: 0, length: 512 },
      { offset: 300 * MiB, length: KiB },
      { offset: 700 * MiB, length: 4 * KiB },
      { offset: 1024 * MiB - 512, length: 512 },
    ];
    expect(await qemuDirty(img, 'fine')).toEqual(expected);
    ({ g } = await open(img));
    const node = g.node('n') as unknown as BlockNode;
    expect([...node.findDirtyBitmap('fine')!.dirtyRanges()]).toEqual(expected);
    await g.close();
  }, 30_000);

  it('a bitmap left in use is inconsistent: kept as found, removable', async () => {
    const img = tmp.path('crashed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', img, 'b1');
    // Opened for writing and never closed: as a crash leaves it.
    const { node } = await open(img, false, 'off');
    expect(node.findDirtyBitmap('b0')!.inconsistent).toBe(false);
    const again = await open(img, true, 'off');
    const b0 = again.node.findDirtyBitmap('b0')!;
    expect(b0.inconsistent).toBe(true);
    expect(b0.readOnly).toBe(true);
    await again.g.close();
    const rw = await open(img, false, 'off');
    expect(rw.node.findDirtyBitmap('b1')!.info()).toMatchObject({ inconsistent: true });
    await blockDirtyBitmapRemove(rw.g, 'n', 'b1');
    await rw.g.close();
    expect(await infoBitmaps(img)).toEqual([
      { name: 'b0', granularity: 65536, flags: ['in-use', 'auto'] },
    ]);
    check(img);
  }, 30_000);
});
