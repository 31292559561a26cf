import { execFileSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { BdrvDirtyBitmap, BlockGraph, blockResize, defaultGranularity } from '../src/index.ts';
import type { BlockNode } from '../src/node.ts';
import { pattern, qemuImg, tempDir } from './helpers.ts';
import { rng } from './qcow2-helpers.ts';

const KiB = 1024;
const MiB = 1 << 20;
const tmp = tempDir();
afterAll(() => tmp.cleanup());

function qemuIo(...args: string[]): void {
  execFileSync('qemu-io', args);
}

describe('BdrvDirtyBitmap', () => {
  it('refuses granularities that are not a power of two in 512 B .. 2 GiB', () => {
    expect(() => new BdrvDirtyBitmap(MiB, 256)).toThrow(
      'Granularity must be power of 2 and at least 512',
    );
    expect(() => new BdrvDirtyBitmap(MiB, 3 * KiB)).toThrow('power of 2');
    expect(() => new BdrvDirtyBitmap(MiB, 2 ** 32)).toThrow('at most 2147483648');
    expect(new BdrvDirtyBitmap(MiB, 512).granularity).toBe(512);
    expect(new BdrvDirtyBitmap(MiB, 2 ** 31).granularity).toBe(2 ** 31);
  });

  it('defaults to the cluster size within 4 KiB .. 64 KiB, 64 KiB when unknown', () => {
    expect(defaultGranularity(undefined)).toBe(64 * KiB);
    expect(defaultGranularity(512)).toBe(4 * KiB);
    expect(defaultGranularity(16 * KiB)).toBe(16 * KiB);
    expect(defaultGranularity(2 * MiB)).toBe(64 * KiB);
  });

  it('sets and resets whole granules, counts bytes, finds dirty and clean ranges', () => {
    const b = new BdrvDirtyBitmap(10 * MiB + 100, 64 * KiB);
    expect(b.count()).toBe(0);
    expect(b.nextDirty(0)).toBe(-1);
    b.set(100, 1); // granule 0
    b.set(64 * KiB - 1, 2); // granules 0 and 1
    expect(b.count()).toBe(128 * KiB);
    expect(b.nextDirtyArea(0)).toEqual({ offset: 0, length: 128 * KiB });
    expect(b.nextDirtyArea(10)).toEqual({ offset: 10, length: 128 * KiB - 10 });
    b.set(10 * MiB + 50, 10); // the partial last granule
    expect(b.nextDirtyArea(128 * KiB)).toEqual({ offset: 10 * MiB, length: 100 });
    expect(b.nextZero(0)).toBe(128 * KiB);
    b.reset(64 * KiB + 5, 1);
    expect(b.count()).toBe(64 * KiB + 64 * KiB);
    expect([...b.dirtyRanges()]).toEqual([
      { offset: 0, length: 64 * KiB },
      { offset: 10 * MiB, length: 100 },
    ]);
    expect(b.nextDirtyArea(0, 10 * MiB + 100, 1000)).toEqual({ offset: 0, length: 1000 });
    b.clear();
    expect(b.count()).toBe(0);
    expect(b.nextDirty(0)).toBe(-1);
  });

  it('agrees with a plain array over random set/reset/merge (the summary level)', () => {
    const g = 512;
    const size = 3000 * g + 17;
    const granules = Math.ceil(size / g);
    const next = rng(7);
    const b = new BdrvDirtyBitmap(size, g);
    const model = new Array<boolean>(granules).fill(false);
    for (let i = 0; i < 3000; i++) {
      const off = Math.floor(next() * size);
      const len = 1 + Math.floor(next() * (next() < 0.1 ? 200 * g : 3 * g));
      const on = next() < 0.55;
      if (on) b.set(off, len);
      else b.reset(off, len);
      for (let k = Math.floor(off / g); k < Math.ceil(Math.min(off + len, size) / g); k++) {
        model[k] = on;
      }
      if (i % 100 === 0) {
        expect(b.count()).toBe(model.filter(Boolean).length * g);
        const from = Math.floor(next() * size);
        const k = model.findIndex((v, j) => v && j >= Math.floor(from / g));
        expect(b.nextDirty(from)).toBe(k < 0 ? -1 : Math.max(from, k * g));
      }
    }
    const ranges = [...b.dirtyRanges()];
    const rebuilt = new Array<boolean>(granules).fill(false);
    for (const r of ranges)
      for (let o = r.offset; o < r.offset + r.length; o += g) rebuilt[o / g] = true;
    expect(rebuilt).toEqual(model);
    const c = new BdrvDirtyBitmap(size, g);
    c.merge(b);
    expect([...c.dirtyRanges()]).toEqual(ranges);
  });

  it('follows a resize: new space clean, dropped granules gone', () => {
    const b = new BdrvDirtyBitmap(MiB, 64 * KiB);
    b.set(0, MiB);
    b.truncate(2 * MiB);
    expect(b.count()).toBe(MiB);
    expect(b.nextDirty(MiB)).toBe(-1);
    b.truncate(MiB / 2 + 1);
    expect(b.count()).toBe(MiB / 2 + 64 * KiB);
    expect(b.size).toBe(MiB / 2 + 1);
  });
});

describe('dirty bitmaps of a node', () => {
  it('are marked by writes, write-zeroes, discard and copy-on-read; not when disabled', async () => {
    const base = tmp.path('base.qcow2');
    const top = tmp.path('top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    const g = new BlockGraph();
    await g.add({
      driver: 'copy-on-read',
      'node-name': 'cor',
      discard: 'unmap',
      file: {
        driver: 'qcow2',
        'node-name': 'top',
        file: { driver: 'file', filename: top },
      },
    });
    const node = g.node('top') as unknown as BlockNode;
    expect(node.defaultBitmapGranularity()).toBe(64 * KiB);
    const bm = node.createDirtyBitmap(64 * KiB, 'b0');
    const off = node.createDirtyBitmap(4 * KiB);
    off.enabled = false;
    expect(() => node.createDirtyBitmap(4 * KiB, 'b0')).toThrow('Bitmap already exists: b0');
    const b = await g.createBackend('cor', { write: true });
    await b.write(0, pattern(1, 0, 4 * KiB));
    await b.writeZeroes(MiB, 128 * KiB);
    await b.trim(2 * MiB, 64 * KiB);
    expect([...bm.dirtyRanges()]).toEqual([
      { offset: 0, length: 64 * KiB },
      { offset: MiB, length: 128 * KiB },
      { offset: 2 * MiB, length: 64 * KiB },
    ]);
    await b.close();
    await g.close();
    // A read through copy-on-read of data in the backing file writes it into top.
    qemuIo('-c', 'write -P 0x11 0 64k', base);
    qemuImg('create', '-q', '-f', 'qcow2', top, '4M');
    const g2 = new BlockGraph();
    await g2.add({
      driver: 'copy-on-read',
      'node-name': 'cor',
      file: {
        driver: 'qcow2',
        'node-name': 'top',
        file: { driver: 'file', filename: top },
        backing: { driver: 'qcow2', file: { driver: 'file', filename: base } },
      },
    });
    const n2 = g2.node('top') as unknown as BlockNode;
    const bm2 = n2.createDirtyBitmap(64 * KiB);
    const r = await g2.createBackend('cor');
    await r.read(0, Buffer.alloc(4 * KiB)); // allocated in base (written above): copied up
    await r.read(3 * MiB, Buffer.alloc(4 * KiB)); // nowhere: nothing to copy
    expect([...bm2.dirtyRanges()]).toEqual([{ offset: 0, length: 64 * KiB }]);
    expect(off.count()).toBe(0);
    await r.close();
    await g2.close();
  });

  it('follow block_resize of the node', async () => {
    const img = tmp.path('r.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
    const g = new BlockGraph();
    await g.add({ driver: 'qcow2', 'node-name': 'n', file: { driver: 'file', filename: img } });
    const node = g.node('n') as unknown as BlockNode;
    const bm = node.createDirtyBitmap();
    await blockResize(g, { nodeName: 'n', size: 2 * MiB });
    expect(bm.size).toBe(2 * MiB);
    await g.close();
  });
});
