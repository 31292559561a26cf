import { execFileSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph, BlockIoError } from '../src/index.ts';
import { pattern, tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());
const KiB = 1024;
const MiB = 1 << 20;

async function elapsed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return (performance.now() - t0) / 1000;
}

describe('throttle', () => {
  it('holds reads to bps-read (lower bound only) without blocking the event loop', async () => {
    const g = new BlockGraph();
    await g.add({
      driver: 'throttle',
      'node-name': 't',
      limits: { 'bps-read': 4 * MiB },
      file: { driver: 'null-co', size: 64 * MiB },
    });
    const b = await g.createBackend('t');
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    const total = 2 * MiB;
    const req = 64 * KiB;
    const secs = await elapsed(() =>
      Promise.all(
        Array.from({ length: total / req }, (_, i) => b.read(i * req, Buffer.alloc(req))),
      ),
    );
    clearInterval(timer);
    // The bucket holds avg/10 before requests wait; the last request may go once the level
    // is back under it: (total - request - avg/10) / avg at least.
    const bound = (total - req - (4 * MiB) / 10) / (4 * MiB);
    expect(secs).toBeGreaterThanOrEqual(bound * 0.95);
    expect(ticks).toBeGreaterThan(0);
    await g.close();
  });

  it('holds writes to iops-write, and a burst lets iops-read-max go first', async () => {
    const g = new BlockGraph();
    await g.add({
      driver: 'throttle',
      'node-name': 't',
      limits: {
        'iops-write': 100,
        'iops-read': 20,
        'iops-read-max': 40,
        'iops-read-max-length': 1,
      },
      file: { driver: 'null-co', size: 64 * MiB },
    });
    const b = await g.createBackend('t', { write: true });
    const w = await elapsed(() =>
      Promise.all(Array.from({ length: 30 }, (_, i) => b.write(i * 4096, Buffer.alloc(4096)))),
    );
    expect(w).toBeGreaterThanOrEqual(((30 - 1 - 10) / 100) * 0.95);
    const r = await elapsed(() =>
      Promise.all(Array.from({ length: 50 }, (_, i) => b.read(i * 4096, Buffer.alloc(4096)))),
    );
    expect(r).toBeGreaterThanOrEqual(((50 - 1 - 40) / 20) * 0.95);
    await g.close();
  });

  it('lets queued requests go when the graph drains, so graph changes do not wait for limits', async () => {
    const g = new BlockGraph();
    await g.add({ driver: 'null-co', 'node-name': 'n', size: 64 * MiB });
    await g.add({ driver: 'throttle', 'node-name': 't', limits: { 'iops-total': 1 }, file: 'n' });
    const b = await g.createBackend('t');
    let done = 0;
    const reads = Array.from({ length: 60 }, (_, i) =>
      b.read(i * 512, Buffer.alloc(512)).then(() => done++),
    );
    // At one request a second these would take a minute (past the test's timeout): the
    // drained section lets them go.
    await g.drainedBegin();
    await new Promise((resolve) => setImmediate(resolve));
    expect(done).toBe(60);
    expect(g.lock.inFlight).toBe(0);
    g.drainedEnd();
    await Promise.all(reads);
    await g.close();
  });
});

describe('throttle groups', () => {
  it("qom-set of a group's limits merges them into the live group: waiting requests go", async () => {
    const g = new BlockGraph();
    await g.addObject({
      'qom-type': 'throttle-group',
      id: 'tg1',
      limits: { 'iops-total': 1, 'bps-read': 1 << 30 },
    });
    await g.add({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
    await g.add({ driver: 'throttle', 'node-name': 't', 'throttle-group': 'tg1', file: 'n' });
    const b = await g.createBackend('t');
    // At one request a second these would take most of a minute.
    const reads = Promise.all(Array.from({ length: 40 }, () => b.read(0, Buffer.alloc(512))));
    expect(() => g.objects.setProperty('tg1', 'x-iops-total', 0)).toThrow(
      'Property cannot be set after initialization',
    );
    expect(() => g.objects.setProperty('tg1', 'limits', { 'iops-total-max': 1 })).toThrow(
      /iops-total-max/,
    );
    g.objects.setProperty('tg1', 'limits', { 'iops-total': 0 });
    expect(g.objects.get('throttle-group', 'tg1', 'id').limits).toEqual({
      'iops-total': 0,
      'bps-read': 1 << 30,
    });
    await reads;
    await b.close();
    await g.close();
  });

  it('nodes of one throttle-group share its limits; the group cannot go while used', async () => {
    const g = new BlockGraph();
    await g.addObject({ 'qom-type': 'throttle-group', id: 'tg0', limits: { 'iops-total': 100 } });
    await expect(g.addObject({ 'qom-type': 'throttle-group', id: 'tg0' })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_DUPLICATE_OBJECT',
    });
    await expect(g.addObject({ 'qom-type': 'rng-random', id: 'r0' })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_OPTION',
      key: 'qom-type',
    });
    await g.add({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
    await g.add({ driver: 'throttle', 'node-name': 'a', 'throttle-group': 'tg0', file: 'n' });
    await g.add({ driver: 'throttle', 'node-name': 'b', 'throttle-group': 'tg0', file: 'n' });
    await expect(
      g.add({ driver: 'throttle', 'throttle-group': 'nosuch', file: 'n' }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'throttle-group' });
    await expect(g.add({ driver: 'throttle', file: 'n' })).rejects.toMatchObject({
      key: 'throttle-group',
    });
    expect(g.queryObjects()).toEqual([
      {
        id: 'tg0',
        'qom-type': 'throttle-group',
        users: 2,
        props: { limits: { 'iops-total': 100 } },
      },
    ]);
    const ba = await g.createBackend('a');
    const bb = await g.createBackend('b');
    // 30 requests on each node, 60 in all against one bucket of 100 IOPS (10 of burst).
    const secs = await elapsed(() =>
      Promise.all(
        Array.from({ length: 60 }, (_, i) => (i % 2 ? ba : bb).read(i * 512, Buffer.alloc(512))),
      ),
    );
    expect(secs).toBeGreaterThanOrEqual(((60 - 1 - 10) / 100) * 0.95);
    await expect(g.delObject('tg0')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OBJECT_IN_USE',
    });
    await ba.close();
    await bb.close();
    await g.del('a');
    await g.del('b');
    await g.delObject('tg0');
    await expect(g.delObject('tg0')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OBJECT_NOT_FOUND',
    });
    await g.close();
  });
});

describe('blkdebug', () => {
  it('injects an errno on a chosen op and range after N events, once; the graph stays usable', async () => {
    const path = tmp.file('dbg.img', pattern(1, 0, MiB));
    const g = new BlockGraph();
    await g.add({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: path } });
    await g.add({
      driver: 'blkdebug',
      'node-name': 'dbg',
      'inject-error': [
        { iotype: 'read', errno: 'ENOSPC', offset: 65536, length: 4096, after: 2, once: true },
        { iotype: ['write', 'flush'], errno: 5 },
      ],
      image: 'disk',
    });
    const b = await g.createBackend('dbg', { write: true });
    const buf = Buffer.alloc(4096);
    await b.read(65536, buf);
    await b.read(65536 + 1000, Buffer.alloc(10));
    await b.read(0, buf); // outside the range: not counted
    const err = await b.read(65536 + 4000, Buffer.alloc(200)).catch((e) => e);
    expect(err).toBeInstanceOf(BlockIoError);
    expect(err).toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      errnoName: 'ENOSPC',
      errno: 28,
      syscall: 'blkdebug',
      node: 'dbg',
    });
    // once: the next read of the range works.
    await b.read(65536, buf);
    expect(Buffer.compare(buf, pattern(1, 65536, 4096))).toBe(0);
    // always: every write and flush fails with EIO.
    for (let i = 0; i < 3; i++) {
      await expect(b.write(i * 512, Buffer.alloc(512, 1))).rejects.toMatchObject({
        errnoName: 'EIO',
        errno: 5,
      });
    }
    await expect(b.flush()).rejects.toMatchObject({ errnoName: 'EIO' });
    expect(g.lock.inFlight).toBe(0);
    // Take the filter out: the backend moves to the node below and writes work.
    await g.replaceNode('dbg', 'disk');
    await g.del('dbg');
    expect(b.nodeName).toBe('disk');
    await b.write(0, Buffer.alloc(512, 7));
    await b.read(0, buf);
    expect(buf.subarray(0, 512).every((x) => x === 7)).toBe(true);
    expect(Buffer.compare(buf.subarray(512), pattern(1, 512, 3584))).toBe(0);
    await g.close();
  });

  it('under a qcow2, passes its allocations past the end of the file through (the format grows it)', async () => {
    const path = tmp.path('grow.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '4M']);
    const g = new BlockGraph();
    await g.add({
      driver: 'qcow2',
      'node-name': 'q',
      file: {
        driver: 'blkdebug',
        'node-name': 'dbg',
        'inject-error': [{ iotype: 'write', errno: 'EIO', once: true }],
        image: { driver: 'file', filename: path },
      },
    });
    const b = await g.createBackend('q', { write: true });
    // The allocation's data write is past the file's end: blkdebug sees it and fails it.
    await expect(b.write(MiB, pattern(2, 0, 64 * KiB))).rejects.toMatchObject({
      errnoName: 'EIO',
      syscall: 'blkdebug',
    });
    await b.write(MiB, pattern(2, 0, 64 * KiB));
    const buf = Buffer.alloc(64 * KiB);
    await b.read(MiB, buf);
    expect(Buffer.compare(buf, pattern(2, 0, 64 * KiB))).toBe(0);
    await b.close();
    await g.close();
    execFileSync('qemu-img', ['check', '-q', path]);
  });
});

describe('null-co', () => {
  it('reads zeros, swallows writes, waits its latency', async () => {
    const g = new BlockGraph();
    await g.add({ driver: 'null-co', 'node-name': 'n', size: MiB, 'latency-ns': 20_000_000 });
    const b = await g.createBackend('n', { write: true });
    const buf = Buffer.alloc(4096, 0xff);
    const secs = await elapsed(() => b.read(0, buf));
    expect(buf.every((x) => x === 0)).toBe(true);
    expect(secs).toBeGreaterThanOrEqual(0.019);
    await b.write(0, Buffer.alloc(4096, 1));
    await b.read(0, buf);
    expect(buf.every((x) => x === 0)).toBe(true);
    expect(await b.blockStatus(0, MiB)).toEqual([
      { length: MiB, hole: false, zero: true, depth: 1 },
    ]);
    await g.close();
  });
});
