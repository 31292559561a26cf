// How a mirror asks its source's block status: the first request of an iteration is answered
// before its operations ask theirs. A file protocol caches the data region SEEK_HOLE found,
// but only once a lookup has returned: 16 operations asking together each walked the page
// cache of a tmpfs image to its end (a 1 GiB mirror spent seconds in lseek).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type BlockDriver, BlockGraph } from '../src/index.ts';
import { mirrorToReady } from './helpers.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-mirror-status-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Byte x of the source. */
const byteAt = (x: number): number => (x * 7 + (x >>> 16)) & 0xff;

/**
 * A protocol whose every byte is data, that counts the block-status requests it is asked
 * and how many were under way at once (each answers on a later turn of the event loop, as
 * an lseek on the thread pool does).
 */
function probeDriver() {
  /** beside: requests that started while the first was under way. */
  const seen = { calls: 0, active: 0, beside: 0, firstActive: false };
  const driver: BlockDriver = {
    name: 'probe',
    async open() {
      return {
        size: () => SIZE,
        async pread(buf: Uint8Array, offset: number) {
          for (let i = 0; i < buf.byteLength; i++) buf[i] = byteAt(offset + i);
        },
        async blockStatus(_offset: number, length: number) {
          if (++seen.calls > 1 && seen.firstActive) seen.beside++;
          seen.active++;
          if (seen.calls === 1) seen.firstActive = true;
          await new Promise((r) => setImmediate(r));
          seen.active--;
          if (seen.active === 0) seen.firstActive = false;
          return { length, hole: false, zero: false };
        },
      };
    },
  };
  return { driver, seen };
}

describe('mirror block status', () => {
  it('is asked once before the operations ask theirs, and the copy is whole', async () => {
    const { driver, seen } = probeDriver();
    const graph = new BlockGraph({ drivers: [driver] });
    const target = join(dir, 'target.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', target, String(SIZE)]);
    try {
      await graph.add({ driver: 'probe', 'node-name': 'src' });
      await graph.add({
        driver: 'raw',
        'node-name': 'tgt',
        file: { driver: 'file', filename: target },
      });
      const bj = await mirrorToReady(graph, { device: 'src', target: 'tgt' });
      expect(seen.calls).toBeGreaterThan(1);
      expect(seen.beside).toBe(0);
      bj.job.complete();
      await bj.job.wait();
    } finally {
      await graph.close();
    }
    const got = readFileSync(target);
    let bad = -1;
    for (let i = 0; i < SIZE && bad < 0; i++) if (got[i] !== byteAt(i)) bad = i;
    expect(bad).toBe(-1);
  });
});
