// Graph changes (replace a child, insert and remove filters) racing thousands of requests
// in flight, with every byte verified: the drained graph change must never let a request
// see a half-changed graph (a closed file, a filter half attached).

import { readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { pattern, tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

const BLOCK = 4096;
const BLOCKS = 2048; // 8 MiB
const WAVES = 10;
const PER_WAVE = 2000;
const BURSTS = 4;

describe('graph changes against requests in flight', () => {
  it('replaces children and inserts/removes filters while thousands of requests run; data verified', async () => {
    const path = tmp.file('race.img', pattern(0, 0, BLOCK * BLOCKS));
    const g = new BlockGraph();
    // O_DIRECT: the writes below are unaligned, so each is a read-modify-write that holds its
    // file node across several I/Os (a graph change that did not drain would close the file
    // under it).
    // Two file nodes on one file take turns as the child: no image locks between them.
    await g.add({
      driver: 'file',
      'node-name': 'f0',
      filename: path,
      locking: 'off',
      cache: { direct: true },
    });
    await g.add({ driver: 'raw', 'node-name': 'disk', file: 'f0' });
    const b = await g.createBackend('disk', { write: true });
    // What each block holds now: the seed of its pattern.
    const seeds = new Uint32Array(BLOCKS);
    let running = true;
    let changes = 0;
    let fileSeq = 0;
    const filters = [
      { driver: 'throttle', limits: { 'iops-total': 10_000_000 } },
      { driver: 'blkdebug' },
      { driver: 'copy-on-read' },
    ];
    const changer = (async () => {
      while (running) {
        // Replace the protocol child with a new node on the same file; drop the old one
        // (its file is closed: a request still using it would fail).
        const old = `f${fileSeq}`;
        const next = `f${++fileSeq}`;
        await g.add({
          driver: 'file',
          'node-name': next,
          filename: path,
          locking: 'off',
          cache: { direct: true },
        });
        await g.replaceChild('disk', 'file', next);
        await g.del(old);
        changes += 3;
        // Insert a filter above the disk, then take it out again.
        const f = filters[changes % filters.length]!;
        const key = f.driver === 'blkdebug' ? 'image' : 'file';
        await g.add({ ...f, 'node-name': 'flt', [key]: 'disk' });
        await g.replaceNode('disk', 'flt');
        expect(b.nodeName).toBe('flt');
        await new Promise((resolve) => setImmediate(resolve));
        await g.replaceNode('flt', 'disk');
        await g.del('flt');
        changes += 4;
      }
    })();
    let requests = 0;
    for (let wave = 1; wave <= WAVES; wave++) {
      const ops: Promise<void>[] = [];
      // Blocks of one parity are written this wave, the others read and checked.
      for (let i = 0; i < PER_WAVE; i++) {
        // Requests come in bursts: graph changes start while some are in flight and others
        // arrive during the drained section.
        if (i % (PER_WAVE / BURSTS) === 0) await new Promise((resolve) => setImmediate(resolve));
        const block = (i * 7919 + wave * 104729) % BLOCKS;
        const off = block * BLOCK;
        if (block % 2 === wave % 2) {
          if (ops.length % 3 === 0) continue;
          const seed = wave * 100_000 + i;
          const data = pattern(seed, off, BLOCK);
          const cut = 1000 + (i % 7) * 3;
          ops.push(
            Promise.all([
              b.write(off, data.subarray(0, cut)),
              b.write(off + cut, data.subarray(cut)),
            ]).then(() => {
              seeds[block] = seed;
            }),
          );
        } else {
          const want = seeds[block]!;
          const buf = Buffer.alloc(BLOCK);
          ops.push(
            b.read(off, buf).then(() => {
              if (Buffer.compare(buf, pattern(want, off, BLOCK)) !== 0) {
                throw new Error(`block ${block} does not hold pattern ${want}`);
              }
            }),
          );
        }
      }
      requests += ops.length;
      await Promise.all(ops);
    }
    running = false;
    await changer;
    expect(requests).toBeGreaterThan(13_000);
    expect(changes).toBeGreaterThan(20);
    await b.flush();
    await g.close();
    // What is in the file is what the requests wrote, block by block.
    const bytes = readFileSync(path);
    for (let block = 0; block < BLOCKS; block++) {
      const off = block * BLOCK;
      const ok =
        Buffer.compare(bytes.subarray(off, off + BLOCK), pattern(seeds[block]!, off, BLOCK)) === 0;
      if (!ok) expect.fail(`block ${block} does not hold pattern ${seeds[block]}`);
    }
  });
});
