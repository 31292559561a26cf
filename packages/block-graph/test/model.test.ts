// Random requests against a model: the generic layer (alignment, read-modify-write,
// splitting, write-zeroes, discard, allocation with copy on write, backing fall-through)
// must read back exactly what a plain byte array says, with requests running concurrently
// on disjoint ranges and in sequence on overlapping ones.

import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { cowFormat } from './cow-format.ts';
import { pattern, tempDir, writeFile } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

const SIZE = 4 << 20;

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

type Build = (g: BlockGraph) => Promise<{ node: string; model: Buffer }>;

const graphs: [string, Build][] = [
  ...(['io_uring', 'aio', 'threadpool'] as const).map((aio): [string, Build] => [
    `raw over an O_DIRECT file (engine backend ${aio})`,
    async (g) => {
      const path = tmp.file(`m1-${aio}.img`, pattern(1, 0, SIZE));
      await g.add({
        driver: 'raw',
        'node-name': 'top',
        discard: 'unmap',
        cache: { direct: true },
        file: { driver: 'file', filename: path, aio },
      });
      return { node: 'top', model: pattern(1, 0, SIZE) };
    },
  ]),
  [
    'blkdebug (align 4096, max-transfer 16 KiB) over raw with an offset',
    async (g) => {
      const path = tmp.file('m2.img', pattern(2, 0, SIZE + 8192));
      await g.add({
        driver: 'blkdebug',
        'node-name': 'top',
        align: 4096,
        'max-transfer': 16384,
        image: { driver: 'raw', offset: 8192, file: { driver: 'file', filename: path } },
      });
      return { node: 'top', model: pattern(2, 8192, SIZE) };
    },
  ],
  [
    'an allocating format (8 KiB clusters) over a raw backing, through copy-on-read',
    async (g) => {
      const base = tmp.file('m3-base.img', pattern(3, 0, SIZE / 2));
      writeFile(tmp.path('m3-top.img'), Buffer.alloc(0));
      await g.add({ driver: 'raw', 'node-name': 'base', file: { driver: 'file', filename: base } });
      await g.add({
        driver: 'copy-on-read',
        'node-name': 'top',
        file: {
          driver: 'test-cow',
          size: SIZE,
          'cluster-size': 8192,
          backing: 'base',
          file: { driver: 'file', filename: tmp.path('m3-top.img'), cache: { direct: true } },
        },
      });
      return {
        node: 'top',
        model: Buffer.concat([pattern(3, 0, SIZE / 2), Buffer.alloc(SIZE / 2)]),
      };
    },
  ],
];

describe('random requests against a model', () => {
  for (const [name, build] of graphs) {
    it(name, async () => {
      const g = new BlockGraph({ drivers: [cowFormat] });
      const { node, model } = await build(g);
      const b = await g.createBackend(node, { write: true });
      const rand = rng(name.length * 7919);
      const pick = (max: number) => Math.floor(rand() * max);
      for (let round = 0; round < 40; round++) {
        // A batch of requests on disjoint 64 KiB slots, all in flight together.
        const slots = new Set<number>();
        while (slots.size < 16) slots.add(pick(SIZE / 65536));
        await Promise.all(
          [...slots].map(async (slot) => {
            const base = slot * 65536;
            const off = base + pick(60000);
            const len = 1 + pick(65536 - (off - base) - 1);
            const kind = pick(10);
            if (kind < 4) {
              const data = pattern(round * 1000 + slot, off, len);
              await b.write(off, data, { fua: kind === 0 });
              data.copy(model, off);
            } else if (kind < 6) {
              await b.writeZeroes(off, len, { noHole: kind === 5 });
              model.fill(0, off, off + len);
            } else if (kind < 7) {
              await b.trim(off, len);
              // Discarded bytes read as anything: take what the node now says.
              const now = Buffer.alloc(len);
              await b.read(off, now);
              now.copy(model, off);
            } else {
              const buf = Buffer.alloc(len);
              await b.read(off, buf);
              if (Buffer.compare(buf, model.subarray(off, off + len)) !== 0) {
                throw new Error(`round ${round}: read at ${off} (+${len}) differs from the model`);
              }
            }
          }),
        );
      }
      const all = Buffer.alloc(SIZE);
      await b.read(0, all);
      expect(Buffer.compare(all, model)).toBe(0);
      // Block status covers the whole disk, and says zero only where the model has zeros.
      const ext = await b.blockStatus(0, SIZE);
      let pos = 0;
      for (const e of ext) {
        if (e.zero) expect(model.subarray(pos, pos + e.length).every((x) => x === 0)).toBe(true);
        pos += e.length;
      }
      expect(pos).toBe(SIZE);
      await g.close();
    });
  }
});
