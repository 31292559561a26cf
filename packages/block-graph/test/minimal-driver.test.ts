// The smallest driver, as small as an nbdkit plugin: a name, open, size and read. The
// generic layer does the rest: block status (all data), alignment and splitting to the
// driver's limits, and refusing writes.
import { describe, expect, it } from 'vitest';
import type { BlockDriver, Limits } from '../src/index.ts';
import { BlockGraph } from '../src/index.ts';

const SIZE = 1 << 20;

/** Byte x of the disk: nbdkit's pattern plugin, one byte at a time. */
function expected(offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = ((offset + i) * 7 + ((offset + i) >>> 8)) & 0xff;
  return out;
}

/** The 'pattern' protocol: what it was asked, to see what the generic layer sends. */
function patternDriver(limits?: Limits): { driver: BlockDriver; reads: [number, number][] } {
  const reads: [number, number][] = [];
  const driver: BlockDriver = {
    name: 'pattern',
    async open() {
      return {
        size: () => SIZE,
        async pread(buf: Uint8Array, offset: number) {
          reads.push([offset, buf.byteLength]);
          buf.set(expected(offset, buf.byteLength));
        },
        ...(limits && { limits }),
      };
    },
  };
  return { driver, reads };
}

describe('a minimal read-only driver (name, open, size, read)', () => {
  it('is read through a backend, and through a format node on top', async () => {
    const { driver } = patternDriver();
    const g = new BlockGraph({ drivers: [driver] });
    await g.add({ driver: 'pattern', 'node-name': 'p' });
    await g.add({ driver: 'raw', 'node-name': 'r', offset: 4096, file: 'p' });
    const b = await g.createBackend('p');
    const top = await g.createBackend('r');
    expect(b.size()).toBe(SIZE);
    expect(top.size()).toBe(SIZE - 4096);
    const buf = Buffer.alloc(10_000);
    await b.read(12_345, buf);
    expect(buf.equals(expected(12_345, 10_000))).toBe(true);
    await top.read(100, buf);
    expect(buf.equals(expected(4096 + 100, 10_000))).toBe(true);
    await g.close();
  });

  it('reports block status as all data', async () => {
    const { driver } = patternDriver();
    const g = new BlockGraph({ drivers: [driver] });
    await g.add({ driver: 'pattern', 'node-name': 'p' });
    const b = await g.createBackend('p');
    expect(await b.blockStatus(0, SIZE)).toEqual([
      { length: SIZE, hole: false, zero: false, depth: 1 },
    ]);
    await g.close();
  });

  it('refuses writes, zeroing and trims as read-only', async () => {
    const { driver } = patternDriver();
    const g = new BlockGraph({ drivers: [driver] });
    await g.add({ driver: 'pattern', 'node-name': 'p' });
    const b = await g.createBackend('p', { write: true });
    const readOnly = { code: 'ERR_VMDISK_BLOCK_READ_ONLY' };
    await expect(b.write(0, Buffer.alloc(512, 1))).rejects.toMatchObject(readOnly);
    await expect(b.writeZeroes(0, 4096)).rejects.toMatchObject(readOnly);
    await g.close();
  });

  it('gets requests aligned and split to the limits it declares', async () => {
    const { driver, reads } = patternDriver({ requestAlignment: 512, maxTransfer: 4096 });
    const g = new BlockGraph({ drivers: [driver] });
    await g.add({ driver: 'pattern', 'node-name': 'p' });
    const b = await g.createBackend('p');
    const buf = Buffer.alloc(10_000);
    await b.read(100, buf);
    expect(buf.equals(expected(100, 10_000))).toBe(true);
    expect(reads.length).toBeGreaterThan(1);
    for (const [offset, length] of reads) {
      expect(offset % 512).toBe(0);
      expect(length % 512).toBe(0);
      expect(length).toBeLessThanOrEqual(4096);
    }
    // Together they cover the request's aligned range exactly once.
    expect(reads.reduce((n, [, l]) => n + l, 0)).toBe(10_240);
    await g.close();
  });
});
