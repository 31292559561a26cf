// Bochs images built here from the layout (docs/images.md), read through the graph
// and compared byte for byte with what qemu-img convert -f bochs -O raw makes of them.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { pattern, qemuImg, tempDir, writeFile } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

interface BochsSpec {
  version: 1 | 2;
  extentSize: number;
  diskSize: number;
  /** Extra catalog entries beyond what the disk needs. */
  extraEntries?: number;
  /** extent index -> which sectors of it hold data (undefined: extent unallocated). */
  extents: Map<number, (sector: number) => boolean>;
  /** Order in which allocated extents are laid out in the file (default: index order). */
  order?: number[];
  headerSize?: number;
  bitmapSize?: number;
}

function buildBochs(spec: BochsSpec, seed: number): Buffer {
  const headerSize = spec.headerSize ?? 512;
  const entries = Math.ceil(spec.diskSize / spec.extentSize) + (spec.extraEntries ?? 0);
  const sectorsPerExtent = spec.extentSize / 512;
  const bitmapSize = spec.bitmapSize ?? Math.max(512, Math.ceil(sectorsPerExtent / 8));
  const bitmapBlocks = Math.ceil(bitmapSize / 512);
  const extentBlocks = Math.ceil(spec.extentSize / 512);
  const order = spec.order ?? [...spec.extents.keys()].sort((a, b) => a - b);
  const dataStart = headerSize + 4 * entries;
  const perExtent = 512 * (bitmapBlocks + extentBlocks);
  const out = Buffer.alloc(dataStart + perExtent * order.length);
  out.write('Bochs Virtual HD Image', 0, 'latin1');
  out.write('Redolog', 32, 'latin1');
  out.write('Growing', 48, 'latin1');
  out.writeUInt32LE(spec.version === 1 ? 0x00010000 : 0x00020000, 64);
  out.writeUInt32LE(headerSize, 68);
  out.writeUInt32LE(entries, 72);
  out.writeUInt32LE(bitmapSize, 76);
  out.writeUInt32LE(spec.extentSize, 80);
  out.writeBigUInt64LE(BigInt(spec.diskSize), spec.version === 1 ? 84 : 88);
  for (let i = 0; i < entries; i++) out.writeUInt32LE(0xffffffff, headerSize + 4 * i);
  order.forEach((extent, slot) => {
    out.writeUInt32LE(slot, headerSize + 4 * extent);
    const has = spec.extents.get(extent)!;
    const bitmap = dataStart + perExtent * slot;
    for (let s = 0; s < sectorsPerExtent; s++) {
      if (!has(s)) {
        // Garbage in sectors whose bit is clear: they must read as zeros anyway.
        out.fill(0xa5, bitmap + 512 * (bitmapBlocks + s), bitmap + 512 * (bitmapBlocks + s + 1));
        continue;
      }
      out[bitmap + (s >> 3)]! |= 1 << (s & 7);
      pattern(seed + extent, s * 512, 512).copy(out, bitmap + 512 * (bitmapBlocks + s));
    }
  });
  return out;
}

async function readAll(path: string, direct = false): Promise<Buffer> {
  const g = new BlockGraph();
  try {
    await g.add({
      driver: 'bochs',
      'node-name': 'b',
      cache: { direct },
      file: { driver: 'file', filename: path },
    });
    const b = await g.createBackend('b');
    const out = Buffer.alloc(b.size());
    // Odd-sized reads at odd offsets cross sector, bitmap-run and extent boundaries.
    for (let pos = 0; pos < out.length; ) {
      const n = Math.min(out.length - pos, 37_000 + (pos % 3) * 1111);
      await b.read(pos, out.subarray(pos, pos + n));
      pos += n;
    }
    return out;
  } finally {
    await g.close();
  }
}

function qemuConvert(path: string): Buffer {
  const out = `${path}.raw`;
  qemuImg('convert', '-f', 'bochs', '-O', 'raw', path, out);
  return readFileSync(out);
}

type Has = (sector: number) => boolean;

const cases: [string, BochsSpec][] = [
  [
    'v2, sparse extents, partial bitmaps, extents out of order',
    {
      version: 2,
      extentSize: 64 * 1024,
      diskSize: 16 * 64 * 1024,
      extents: new Map<number, Has>([
        [0, () => true],
        [3, (s) => s % 3 === 0],
        [4, (s) => s < 17 || s > 100],
        [9, () => false],
        [15, (s) => (s * 7) % 5 < 2],
      ]),
      order: [15, 3, 0, 9, 4],
    },
  ],
  [
    'v1 header, small extents, a partial last extent',
    {
      version: 1,
      extentSize: 4096,
      diskSize: 4096 * 40 + 3 * 512,
      extents: new Map<number, Has>([
        [1, () => true],
        [2, (s) => s === 7],
        [39, (s) => s !== 0],
        [40, () => true],
      ]),
    },
  ],
  [
    'v2, 1 MiB extents, a bigger header and spare catalog entries, an unaligned disk size',
    {
      version: 2,
      extentSize: 1 << 20,
      diskSize: 3 * (1 << 20) + 1000,
      headerSize: 1024,
      extraEntries: 5,
      extents: new Map<number, Has>([
        [0, (s) => s % 64 < 32],
        [2, () => true],
        [3, (s) => s < 1],
      ]),
    },
  ],
];

describe('bochs', () => {
  for (const [name, spec] of cases) {
    it(`reads byte-identical to qemu-img convert: ${name}`, async () => {
      const path = tmp.path(`${name.replace(/\W+/g, '-')}.bochs`);
      writeFile(path, buildBochs(spec, 11));
      const ours = await readAll(path);
      const theirs = qemuConvert(path);
      expect(ours.length).toBe(theirs.length);
      expect(ours.length).toBe(Math.floor(spec.diskSize / 512) * 512);
      expect(Buffer.compare(ours, theirs)).toBe(0);
      // The same through O_DIRECT (unaligned metadata and data reads bounce).
      expect(Buffer.compare(await readAll(path, true), theirs)).toBe(0);
      // And the test image is not trivially empty.
      expect(ours.some((x) => x !== 0)).toBe(true);
    });
  }

  it('reports block status: unallocated extents and clear bits as zeros, set bits as data', async () => {
    const path = tmp.file('status.bochs', buildBochs(cases[0]![1], 3));
    const g = new BlockGraph();
    await g.add({ driver: 'bochs', 'node-name': 'b', file: { driver: 'file', filename: path } });
    expect(g.query().find((n) => n['node-name'] === 'b')!['read-only']).toBe(true);
    const b = await g.createBackend('b');
    const ext = await b.blockStatus(0, 5 * 65536);
    expect(ext[0]).toEqual({ length: 65536, hole: false, zero: false, depth: 1 });
    expect(ext[1]).toEqual({ length: 2 * 65536, hole: true, zero: true, depth: 1 });
    expect(ext[2]).toEqual({ length: 512, hole: false, zero: false, depth: 1 });
    expect(ext[3]).toEqual({ length: 1024, hole: true, zero: true, depth: 1 });
    await expect(g.createBackend('b', { write: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT',
    });
    await g.close();
  });

  const good = () =>
    buildBochs(
      {
        version: 2,
        extentSize: 4096,
        diskSize: 8 * 4096,
        extents: new Map<number, Has>([[0, () => true]]),
      },
      1,
    );
  // The last field: qemu-img refuses it too (a file cut inside the header QEMU reads as if
  // padded with zeros; we refuse it).
  const corrupt: [string, (b: Buffer) => Buffer, RegExp, boolean?][] = [
    [
      'bad magic',
      (b) => {
        b.write('Bochs Virtual HD Imagf', 0, 'latin1');
        return b;
      },
      /magic/,
    ],
    [
      'bad type',
      (b) => {
        b.write('Undoable', 32, 'latin1');
        return b;
      },
      /type/,
    ],
    [
      'unsupported subtype',
      (b) => {
        b.write('Flat\0\0\0', 48, 'latin1');
        return b;
      },
      /subtype/,
    ],
    [
      'unknown version',
      (b) => {
        b.writeUInt32LE(0x00030000, 64);
        return b;
      },
      /version/,
    ],
    [
      'extent size not a power of two',
      (b) => {
        b.writeUInt32LE(3 * 1024, 80);
        return b;
      },
      /power of two/,
    ],
    [
      'extent size above 8 MiB',
      (b) => {
        b.writeUInt32LE(16 << 20, 80);
        return b;
      },
      /8 MiB/,
    ],
    [
      'extent size below 512',
      (b) => {
        b.writeUInt32LE(256, 80);
        return b;
      },
      /below 512/,
    ],
    [
      'catalog too small for the disk',
      (b) => {
        b.writeBigUInt64LE(BigInt(100 * 4096), 88);
        return b;
      },
      /too small/,
    ],
    [
      'catalog too large',
      (b) => {
        b.writeUInt32LE(0x100001, 72);
        return b;
      },
      /too large/,
    ],
    ['file shorter than the header', (b) => b.subarray(0, 300), /shorter/, false],
  ];
  for (const [name, damage, why, qemuRefuses = true] of corrupt) {
    it(`refuses a corrupt header: ${name}`, async () => {
      const path = tmp.path(`corrupt-${name.replace(/\W+/g, '-')}.bochs`);
      writeFile(path, damage(good()));
      const g = new BlockGraph();
      const err = await g
        .add({ driver: 'bochs', file: { driver: 'file', filename: path } })
        .catch((e) => e);
      expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_CORRUPT_IMAGE' });
      expect(err.message).toMatch(why);
      // Nothing is left open.
      expect(g.query()).toEqual([]);
      await g.close();
      // The oracle refuses it too.
      const r = spawnSync('qemu-img', ['convert', '-f', 'bochs', '-O', 'raw', path, `${path}.raw`]);
      expect(r.status !== 0).toBe(qemuRefuses);
    });
  }
});
