import { appendFileSync, readFileSync, truncateSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { type BlockBackend, BlockError, BlockGraph } from '../src/index.ts';
import { pattern, tempDir, writeFile } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

/** A graph holding one node (blockdev-add options) and a writable backend on it. */
async function withBackend(
  options: { 'node-name': string } & Record<string, unknown>,
): Promise<{ g: BlockGraph; b: BlockBackend }> {
  const g = new BlockGraph();
  await g.add(options);
  return { g, b: await g.createBackend(options['node-name'], { write: true }) };
}

/** The event counters of the blkdebug node `name`. */
function eventsOf(g: BlockGraph, name: string): Record<string, number> {
  return g.query().find((n) => n['node-name'] === name)!.events as Record<string, number>;
}

describe('raw over file', () => {
  it('reads and writes through the graph, the bytes land in the file', async () => {
    const path = tmp.file('a.img', pattern(1, 0, 1 << 20));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'disk0',
      file: { driver: 'file', filename: path },
    });
    expect(b.size()).toBe(1 << 20);
    const buf = b.allocBuffer(8192);
    await b.read(4096, buf);
    expect(Buffer.compare(buf, pattern(1, 4096, 8192))).toBe(0);
    await b.write(100, pattern(2, 100, 5000));
    await b.flush();
    b.releaseBuffer(buf);
    await g.close();
    const bytes = readFileSync(path);
    expect(Buffer.compare(bytes.subarray(100, 5100), pattern(2, 100, 5000))).toBe(0);
    expect(Buffer.compare(bytes.subarray(5100, 9000), pattern(1, 5100, 3900))).toBe(0);
  });

  it('serves a window of the file with offset and size', async () => {
    const path = tmp.file('win.img', pattern(3, 0, 64 * 1024));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'w',
      offset: 4096,
      size: 8192,
      file: { driver: 'file', filename: path },
    });
    expect(b.size()).toBe(8192);
    const buf = Buffer.alloc(8192);
    await b.read(0, buf);
    expect(Buffer.compare(buf, pattern(3, 4096, 8192))).toBe(0);
    await expect(b.read(1, Buffer.alloc(8192))).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
      errnoName: 'EINVAL',
    });
    await b.write(8192 - 10, Buffer.alloc(10, 0xee));
    await g.close();
    const bytes = readFileSync(path);
    expect(bytes.subarray(4096 + 8182, 4096 + 8192).every((x) => x === 0xee)).toBe(true);
    // Nothing outside the window changed.
    expect(
      Buffer.compare(bytes.subarray(4096 + 8192), pattern(3, 4096 + 8192, 64 * 1024 - 12288)),
    ).toBe(0);
    expect(Buffer.compare(bytes.subarray(0, 4096), pattern(3, 0, 4096))).toBe(0);
  });

  it('refuses a window past the end of the file, naming the key', async () => {
    const path = tmp.file('small.img', Buffer.alloc(4096));
    const g = new BlockGraph();
    await expect(
      g.add({ driver: 'raw', offset: 1024, size: 4096, file: { driver: 'file', filename: path } }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'size' });
    await expect(
      g.add({ driver: 'raw', size: 1000, file: { driver: 'file', filename: path } }),
    ).rejects.toMatchObject({
      key: 'size',
    });
    expect(g.query()).toEqual([]);
    await g.close();
  });
});

describe('bounds', () => {
  it('refuses requests outside the node without overflow near 2^53 and 2^64', async () => {
    const { g, b } = await withBackend({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
    const bad: [number, number][] = [
      [-1, 1],
      [1 << 20, 1],
      [(1 << 20) - 1, 2],
      [Number.MAX_SAFE_INTEGER, 1],
      [2 ** 64 - 512, 512],
      [2 ** 63, 4096],
      [0.5, 1],
      [Number.NaN, 1],
    ];
    for (const [off, len] of bad) {
      await expect(b.read(off, Buffer.alloc(len))).rejects.toBeInstanceOf(BlockError);
      await expect(b.write(off, Buffer.alloc(len))).rejects.toMatchObject({
        code: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
      });
      await expect(b.writeZeroes(off, len)).rejects.toMatchObject({
        code: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
      });
    }
    await expect(b.writeZeroes(0, Number.MAX_SAFE_INTEGER)).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OUT_OF_BOUNDS',
    });
    // The last byte is in bounds.
    const one = Buffer.alloc(1, 9);
    await b.read((1 << 20) - 1, one);
    expect(one[0]).toBe(0);
    await g.close();
  });
});

describe('alignment, splitting, zeroes, FUA', () => {
  it('read-modify-write on an O_DIRECT file keeps the bytes around unaligned writes', async () => {
    const path = tmp.file('direct.img', pattern(4, 0, 1 << 20));
    const g = new BlockGraph();
    await g.add({
      driver: 'raw',
      'node-name': 'd',
      cache: { direct: true },
      file: { driver: 'file', filename: path },
    });
    const file = g.query().find((n) => n.driver === 'file')!;
    expect(file['cache-direct']).toBe(true);
    const b = await g.createBackend('d', { write: true });
    const expected = pattern(4, 0, 1 << 20);
    const writes: [number, number][] = [
      [1, 10],
      [511, 2],
      [4000, 5000],
      [65535, 1],
      [100000, 70000],
    ];
    for (const [off, len] of writes) {
      const data = pattern(9, off, len);
      await b.write(off, data);
      data.copy(expected, off);
    }
    const out = Buffer.alloc(300000);
    await b.read(3, out);
    expect(Buffer.compare(out, expected.subarray(3, 300003))).toBe(0);
    await g.close();
    expect(Buffer.compare(readFileSync(path), expected)).toBe(0);
  });

  it('O_DIRECT on a file whose size is not a multiple of the block: tail reads and writes', async () => {
    const path = tmp.path('odd.img');
    const size = 65536 + 1000;
    writeFile(path, pattern(13, 0, size));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'd',
      cache: { direct: true },
      file: { driver: 'file', filename: path },
    });
    expect(b.size()).toBe(size);
    const tail = Buffer.alloc(1500);
    await b.read(size - 1500, tail);
    expect(Buffer.compare(tail, pattern(13, size - 1500, 1500))).toBe(0);
    await b.write(size - 10, Buffer.alloc(10, 0xcc));
    await b.write(65536 + 3, Buffer.alloc(5, 0xdd));
    await g.close();
    const bytes = readFileSync(path);
    expect(bytes.length).toBe(size);
    const expected = pattern(13, 0, size);
    expected.fill(0xcc, size - 10);
    expected.fill(0xdd, 65539, 65544);
    expect(Buffer.compare(bytes, expected)).toBe(0);
  });

  it('serialises overlapping read-modify-writes: no update is lost', async () => {
    const path = tmp.file('rmw.img', Buffer.alloc(64 * 1024));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'd',
      cache: { direct: true },
      file: { driver: 'file', filename: path },
    });
    // 512 one-byte writes into the same few blocks, all in flight at once.
    await Promise.all(
      Array.from({ length: 512 }, (_, i) => b.write(i * 7, Buffer.from([(i % 255) + 1]))),
    );
    const out = Buffer.alloc(512 * 7);
    await b.read(0, out);
    for (let i = 0; i < 512; i++) expect(out[i * 7]).toBe((i % 255) + 1);
    await g.close();
  });

  it('splits requests at max-transfer and aligns them (blkdebug align)', async () => {
    const path = tmp.file('split.img', pattern(5, 0, 1 << 20));
    const { g, b } = await withBackend({
      driver: 'blkdebug',
      'node-name': 'dbg',
      align: 4096,
      'max-transfer': 65536,
      image: { driver: 'file', filename: path },
    });
    const buf = Buffer.alloc(1 << 20);
    await b.read(0, buf);
    expect(Buffer.compare(buf, pattern(5, 0, 1 << 20))).toBe(0);
    const events = () => eventsOf(g, 'dbg');
    expect(events().read).toBe(16);
    // An unaligned write: the blocks around it are read, then written whole.
    await b.write(5000, pattern(6, 5000, 10));
    expect(events().read).toBe(17);
    expect(events().write).toBe(1);
    const check = Buffer.alloc(8192);
    await b.read(4096, check);
    const expected = pattern(5, 4096, 8192);
    pattern(6, 5000, 10).copy(expected, 5000 - 4096);
    expect(Buffer.compare(check, expected)).toBe(0);
    await g.close();
  });

  it('writes zeroes natively (punching holes) and emulates them where not allowed to', async () => {
    const path = tmp.file('zero.img', pattern(7, 0, 1 << 20));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'z',
      discard: 'unmap',
      file: { driver: 'file', filename: path },
    });
    await b.writeZeroes(65536, 131072, {});
    await b.writeZeroes(300001, 1000, { noHole: true });
    const status = await b.blockStatus(0, 1 << 20);
    expect(status[0]).toEqual({ length: 65536, hole: false, zero: false, depth: 1 });
    expect(status[1]).toEqual({ length: 131072, hole: true, zero: true, depth: 1 });
    const out = Buffer.alloc(1 << 20);
    await b.read(0, out);
    const expected = pattern(7, 0, 1 << 20);
    expected.fill(0, 65536, 65536 + 131072);
    expected.fill(0, 300001, 301001);
    expect(Buffer.compare(out, expected)).toBe(0);
    await g.close();
  });

  it('emulates write-zeroes with buffers below a filter with max-transfer, and refuses fast zero', async () => {
    const { g, b } = await withBackend({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
    await b.writeZeroes(0, 4096, { fastZero: true });
    await g.close();
    const path = tmp.file('fz.img', pattern(8, 0, 65536));
    truncateSync(path, 65536);
    const { g: g2, b: b2 } = await withBackend({
      driver: 'blkdebug',
      'node-name': 'dbg',
      'inject-error': [{ iotype: 'write-zeroes', errno: 'ENOTSUP' }],
      image: { driver: 'file', filename: path },
    });
    await expect(b2.writeZeroes(0, 4096, { fastZero: true })).rejects.toMatchObject({
      errnoName: 'ENOTSUP',
    });
    // Without fastZero, the generic layer writes zero buffers instead.
    const events = () => eventsOf(g2, 'dbg');
    await b2.writeZeroes(1000, 20000);
    expect(events().write).toBeGreaterThan(0);
    const out = Buffer.alloc(65536);
    await b2.read(0, out);
    const expected = pattern(8, 0, 65536);
    expected.fill(0, 1000, 21000);
    expect(Buffer.compare(out, expected)).toBe(0);
    await g2.close();
  });

  it('FUA writes are followed by a flush of the node', async () => {
    const path = tmp.file('fua.img', Buffer.alloc(65536));
    const { g, b } = await withBackend({
      driver: 'blkdebug',
      'node-name': 'dbg',
      image: { driver: 'raw', file: { driver: 'file', filename: path } },
    });
    const events = () => eventsOf(g, 'dbg');
    await b.write(0, Buffer.alloc(512, 1));
    expect(events().flush).toBe(0);
    await b.write(0, Buffer.alloc(512, 2), { fua: true });
    expect(events().flush).toBe(1);
    await g.close();
    expect(readFileSync(path)[0]).toBe(2);
  });
});

describe('file options', () => {
  it('opens files through the engine backend the aio option names', async () => {
    const path = tmp.file('aio.img', pattern(11, 0, 65536));
    const g = new BlockGraph();
    for (const [aio, backend] of [
      ['threads', 'threadpool'],
      ['threadpool', 'threadpool'],
      ['native', 'aio'],
      ['io_uring', 'io_uring'],
    ] as const) {
      const node = await g.add({ driver: 'file', filename: path, aio, 'read-only': true });
      expect(g.query().find((n) => n['node-name'] === node.name)!.aio).toBe(backend);
      const b = await g.createBackend(node.name);
      const buf = Buffer.alloc(4096);
      await b.read(8192, buf);
      expect(Buffer.compare(buf, pattern(11, 8192, 4096))).toBe(0);
      await b.close();
      await g.del(node.name);
    }
    await g.close();
  });

  it('block status forgets the data start it found once that data is punched', async () => {
    // 256 KiB hole, then data: the hole's answer remembers where the data starts.
    const path = tmp.file('ds.img', Buffer.alloc(0));
    truncateSync(path, 256 << 10);
    appendFileSync(path, pattern(13, 256 << 10, 256 << 10));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'ds',
      discard: 'unmap',
      file: { driver: 'file', filename: path },
    });
    expect(await b.blockStatus(0, 512 << 10)).toEqual([
      { length: 256 << 10, hole: true, zero: true, depth: 1 },
      { length: 256 << 10, hole: false, zero: false, depth: 1 },
    ]);
    await b.trim(256 << 10, 64 << 10);
    expect(await b.blockStatus(256 << 10, 256 << 10)).toEqual([
      { length: 64 << 10, hole: true, zero: true, depth: 1 },
      { length: 192 << 10, hole: false, zero: false, depth: 1 },
    ]);
    await g.close();
  });

  it('detect-zeroes=unmap turns zero writes into holes', async () => {
    const path = tmp.file('dz.img', pattern(12, 0, 1 << 20));
    const { g, b } = await withBackend({
      driver: 'raw',
      'node-name': 'd',
      'detect-zeroes': 'unmap',
      discard: 'unmap',
      file: { driver: 'file', filename: path },
    });
    await b.write(65536, Buffer.alloc(65536));
    expect(await b.blockStatus(65536, 65536)).toEqual([
      { length: 65536, hole: true, zero: true, depth: 1 },
    ]);
    await b.write(0, Buffer.alloc(4096, 1));
    expect((await b.blockStatus(0, 4096))[0]!.hole).toBe(false);
    await g.close();
  });
});
