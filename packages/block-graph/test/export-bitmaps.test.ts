// A node's dirty bitmaps exported over NBD (block-export-add `bitmaps`): looked up and
// checked with QEMU 7.2's words, busy while exported; nbdinfo (libnbd) reads the context
// qemu:dirty-bitmap:NAME, and so does our nbd driver with QEMU's x-dirty-bitmap.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { NbdServer } from '@vmdisk/nbd';
import { afterAll, describe, expect, it } from 'vitest';
import {
  BlockGraph,
  bitmapExtents,
  blockDirtyBitmapAdd,
  exportDirtyBitmaps,
} from '../src/index.ts';
import { tempDir } from './helpers.ts';

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 4 * MiB;
const tmp = tempDir();
afterAll(() => tmp.cleanup());

/** 'base' (null-co) under the filter 'top' (copy-on-read), 'other' beside them. */
async function graph(): Promise<BlockGraph> {
  const g = new BlockGraph();
  await g.add({ driver: 'null-co', 'node-name': 'base', size: SIZE });
  await g.add({ driver: 'copy-on-read', 'node-name': 'top', file: 'base' });
  await g.add({ driver: 'null-co', 'node-name': 'other', size: SIZE });
  return g;
}

function nbdinfoMap(uri: string, context: string): Promise<Array<[number, number, number]>> {
  return new Promise((resolve, reject) => {
    execFile('nbdinfo', [`--map=${context}`, '--json', uri], (err, stdout, stderr) => {
      if (err) return reject(new Error(`${err.message}\n${stderr}`));
      const extents = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
      resolve(extents.map((e) => [e.offset, e.length, e.type]));
    });
  });
}

describe('exporting dirty bitmaps', () => {
  it('serves the dirty granules of a bitmap found down the chain; busy while exported', async () => {
    const g = await graph();
    const server = new NbdServer();
    try {
      const b0 = blockDirtyBitmapAdd(g, { node: 'base', name: 'b0', granularity: 64 * KiB });
      const b1 = blockDirtyBitmapAdd(g, { node: 'other', name: 'b1', granularity: 4 * KiB });
      const backend = await g.createBackend('top', { write: true });
      await backend.write(100000, Buffer.alloc(5000, 1));
      await backend.write(MiB, Buffer.alloc(200 * KiB, 2));
      await backend.writeZeroes(4190000, 1000);
      const exported = exportDirtyBitmaps(g, 'top', ['b0', { node: 'other', name: 'b1' }], false);
      expect([b0.busy, b1.busy]).toEqual([true, true]);
      const sock = join(tmp.dir, 'bm.sock');
      await server.listen({ path: sock });
      server.addExport({ name: 'top', target: backend, dirtyBitmaps: exported.bitmaps });
      const uri = `nbd+unix:///top?socket=${sock}`;
      // What nbdinfo showed against qemu-storage-daemon 7.2 after the same writes.
      expect(await nbdinfoMap(uri, 'qemu:dirty-bitmap:b0')).toEqual([
        [0, 65536, 0],
        [65536, 65536, 1],
        [131072, 917504, 0],
        [1048576, 262144, 1],
        [1310720, 2818048, 0],
        [4128768, 65536, 1],
      ]);
      expect(await nbdinfoMap(uri, 'qemu:dirty-bitmap:b1')).toEqual([[0, SIZE, 0]]);

      // Our nbd driver reads it with x-dirty-bitmap: dirty shows as a hole, as QEMU's.
      await g.add({
        driver: 'nbd',
        'node-name': 'remote',
        'read-only': true,
        server: { type: 'unix', path: sock },
        export: 'top',
        'x-dirty-bitmap': 'qemu:dirty-bitmap:b0',
      });
      const r = await g.createBackend('remote');
      expect(await r.blockStatus(0, 2 * MiB)).toEqual([
        { length: 65536, hole: false, zero: false, depth: 1 },
        { length: 65536, hole: true, zero: false, depth: 1 },
        { length: 917504, hole: false, zero: false, depth: 1 },
        { length: 262144, hole: true, zero: false, depth: 1 },
        { length: 2 * MiB - 1310720, hole: false, zero: false, depth: 1 },
      ]);
      await r.close();
      await expect(
        g.add({
          driver: 'nbd',
          'node-name': 'missing',
          'read-only': true,
          server: { type: 'unix', path: sock },
          export: 'top',
          'x-dirty-bitmap': 'qemu:dirty-bitmap:nope',
        }),
      ).rejects.toThrow('Could not open image: Invalid argument');
      await g.del('remote');

      await server.removeExport('top', 'hard');
      exported.release();
      expect([b0.busy, b1.busy]).toEqual([false, false]);
      await backend.close();
    } finally {
      await server.close();
      await g.close();
    }
  }, 30_000);

  it("refuses with QEMU's words, marking nothing busy", async () => {
    const g = await graph();
    try {
      const en = blockDirtyBitmapAdd(g, { node: 'base', name: 'en' });
      const dis = blockDirtyBitmapAdd(g, { node: 'top', name: 'dis', disabled: true });
      blockDirtyBitmapAdd(g, { node: 'other', name: 'elsewhere' });
      expect(() => exportDirtyBitmaps(g, 'top', ['nope'], false)).toThrow(
        "Bitmap 'nope' is not found",
      );
      // Only the node and its filtered/backing nodes are searched by name.
      expect(() => exportDirtyBitmaps(g, 'top', ['elsewhere'], false)).toThrow(
        "Bitmap 'elsewhere' is not found",
      );
      expect(() => exportDirtyBitmaps(g, 'top', ['dis', 'en'], true)).toThrow(
        "Enabled bitmap 'en' incompatible with readonly export",
      );
      expect(dis.busy).toBe(false);
      expect(() => exportDirtyBitmaps(g, 'top', [{ node: 'zz', name: 'en' }], true)).toThrow(
        "Node 'zz' not found",
      );
      expect(() => exportDirtyBitmaps(g, 'top', [{ node: 'base', name: 'x' }], true)).toThrow(
        "Dirty bitmap 'x' not found",
      );
      // {node, name} is not held to the read-only rule (as QEMU).
      const ok = exportDirtyBitmaps(g, 'top', ['dis', { node: 'base', name: 'en' }], true);
      expect([dis.busy, en.busy]).toEqual([true, true]);
      expect(() => exportDirtyBitmaps(g, 'top', ['dis'], false)).toThrow(
        "Bitmap 'dis' is currently in use by another operation and cannot be used",
      );
      ok.release();
      en.inconsistent = true;
      expect(() => exportDirtyBitmaps(g, 'top', ['en'], false)).toThrow(
        "Bitmap 'en' is inconsistent and cannot be used",
      );
    } finally {
      await g.close();
    }
  });

  it('reports extents cut to the range asked, from its offset', async () => {
    const g = await graph();
    try {
      const bm = blockDirtyBitmapAdd(g, { node: 'base', name: 'b', granularity: 64 * KiB });
      bm.set(65536, 1);
      bm.set(MiB, 200 * KiB);
      // The replies qemu-storage-daemon 7.2 gave for these ranges.
      expect(bitmapExtents(bm, 1000000, 70000)).toEqual([
        { length: 48576, dirty: false },
        { length: 21424, dirty: true },
      ]);
      expect(bitmapExtents(bm, 10000, 140000)).toEqual([
        { length: 55536, dirty: false },
        { length: 65536, dirty: true },
        { length: 18928, dirty: false },
      ]);
      expect(bitmapExtents(bm, 70000, 1000)).toEqual([{ length: 1000, dirty: true }]);
    } finally {
      await g.close();
    }
  });
});
