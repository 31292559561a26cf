// Real I/O on real files, each backend forced in turn.
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import koffi from 'koffi';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ARENA_CACHE_BYTES, BufferArena } from '../src/arena.ts';
import { type Engine, EngineError, type EngineFile, IoError, openEngine } from '../src/index.ts';
import { BACKENDS, rng, tempDir } from './helpers.ts';

const FILE_SIZE = 4 * 1024 * 1024;

interface Range {
  start: number;
  end: number;
}

function overlaps(a: Range, list: Range[]): boolean {
  return list.some((b) => a.start < b.end && b.start < a.end);
}

/**
 * `count` random reads and writes, up to `depth` in flight, never two in flight over the
 * same bytes; writes are applied to `ref` when they complete, reads compared with `ref`
 * (bytes up to EOF; a read may cross the end of the file and must then come back short).
 */
async function randomIo(
  engine: Engine,
  file: EngineFile,
  ref: Buffer,
  opts: { count: number; depth: number; align: number; maxLen: number; seed: number },
): Promise<{ reads: number; writes: number; shortReads: number }> {
  const rand = rng(opts.seed);
  const active: Range[] = [];
  const stats = { reads: 0, writes: 0, shortReads: 0 };
  let issued = 0;
  let settled = 0;
  return new Promise((resolve, reject) => {
    const one = (): boolean => {
      const a = opts.align;
      const isWrite = rand(2) < 1;
      let len: number;
      let offset: number;
      if (a > 0) {
        len = a * (1 + Math.floor(rand(opts.maxLen / a)));
        const slots = (ref.length - (isWrite ? len : a)) / a;
        offset = a * Math.floor(rand(slots + 1));
      } else {
        len = 1 + Math.floor(rand(opts.maxLen));
        offset = Math.floor(rand(isWrite ? ref.length - len + 1 : ref.length));
      }
      const range = { start: offset, end: offset + len };
      if (overlaps(range, active)) return false;
      active.push(range);
      // Buffers: arena buffers for O_DIRECT; otherwise allocUnsafe, which hands out slices
      // of Node's shared pool for small sizes (the address must be the view's own).
      const buf = a > 0 ? engine.allocBuffer(len) : Buffer.allocUnsafe(len);
      let p: Promise<void>;
      if (isWrite) {
        randomFillSync(buf);
        p = file.write(buf, offset).then(() => {
          buf.copy(ref, offset);
          stats.writes++;
        });
      } else {
        p = file.read(buf, offset).then((n) => {
          const expected = Math.min(len, ref.length - offset);
          expect(n).toBe(expected);
          if (n < len) stats.shortReads++;
          if (!buf.subarray(0, n).equals(ref.subarray(offset, offset + n))) {
            throw new Error(`read at ${offset}+${len} differs from the reference`);
          }
          stats.reads++;
        });
      }
      p.then(() => {
        active.splice(active.indexOf(range), 1);
        if (a > 0) engine.releaseBuffer(buf);
        settled++;
        if (settled === opts.count) resolve(stats);
        else launch();
      }).catch(reject);
      return true;
    };
    const launch = (): void => {
      let tries = 0;
      while (issued < opts.count && active.length < opts.depth && tries < 20) {
        if (one()) issued++;
        else tries++;
      }
    };
    launch();
  });
}

describe.each(BACKENDS)('%s backend', (backend) => {
  let tmp: ReturnType<typeof tempDir>;
  let engine: Engine;

  beforeAll(async () => {
    tmp = tempDir();
    engine = await openEngine({ backend, queueDepth: 32 });
  });
  afterAll(async () => {
    await engine.close();
    tmp.cleanup();
  });

  it('is the backend that was asked for', () => {
    expect(engine.backend).toBe(backend);
  });

  it('random buffered reads and writes match a reference buffer (thousands, many in flight)', async () => {
    const path = tmp.file('buffered.img');
    const ref = randomFillSync(Buffer.alloc(FILE_SIZE));
    writeFileSync(path, ref);
    const f = await engine.openFile(path);
    const stats = await randomIo(engine, f, ref, {
      count: 3000,
      depth: 64,
      align: 0,
      maxLen: 64 * 1024,
      seed: 1,
    });
    expect(stats.reads + stats.writes).toBe(3000);
    expect(stats.writes).toBeGreaterThan(1000);
    await f.fsync();
    await f.close();
    expect(readFileSync(path).equals(ref)).toBe(true);
  });

  it('random O_DIRECT reads and writes with arena buffers match a reference buffer', async () => {
    const path = tmp.file('direct.img');
    const ref = randomFillSync(Buffer.alloc(FILE_SIZE));
    writeFileSync(path, ref);
    const f = await engine.openFile(path, { direct: true });
    expect(f.direct).toBe(true);
    expect([512, 1024, 2048, 4096]).toContain(f.logicalBlockSize);
    const stats = await randomIo(engine, f, ref, {
      count: 1500,
      depth: 48,
      align: f.logicalBlockSize,
      maxLen: 64 * 1024,
      seed: 2,
    });
    expect(stats.reads + stats.writes).toBe(1500);
    await f.close();
    expect(readFileSync(path).equals(ref)).toBe(true);
  });

  it('reads at and across EOF come back short, not as errors', async () => {
    const path = tmp.file('eof.img');
    writeFileSync(path, Buffer.alloc(10_000, 7));
    const f = await engine.openFile(path, { readOnly: true });
    const buf = Buffer.alloc(8192);
    expect(await f.read(buf, 6000)).toBe(4000);
    expect(buf.subarray(0, 4000).every((b) => b === 7)).toBe(true);
    expect(await f.read(buf, 10_000)).toBe(0);
    expect(await f.read(buf, 50_000)).toBe(0);
    expect(await f.size()).toBe(10_000);
    await f.close();
  });

  it('vectored writes and reads, buffered and O_DIRECT', async () => {
    const path = tmp.file('vec.img');
    const f = await engine.openFile(path, { create: true });
    const parts = [1, 4095, 4096, 17, 100_000].map((n) => randomFillSync(Buffer.alloc(n)));
    const all = Buffer.concat(parts);
    await f.writev(parts, 3);
    const outs = [10, 50_000, 3, 58_196].map((n) => Buffer.alloc(n));
    expect(await f.readv(outs, 3)).toBe(all.length);
    expect(Buffer.concat(outs).equals(all)).toBe(true);
    // A vectored read across EOF: the bytes there are, in order.
    const tail = [Buffer.alloc(100), Buffer.alloc(100)];
    expect(await f.readv(tail, 3 + all.length - 150)).toBe(150);
    expect(
      Buffer.concat(tail)
        .subarray(0, 150)
        .equals(all.subarray(all.length - 150)),
    ).toBe(true);
    await f.close();
    expect(readFileSync(path).subarray(3).equals(all)).toBe(true);

    const d = await engine.openFile(path, { direct: true });
    const a = d.logicalBlockSize;
    const bufs = [engine.allocBuffer(a), engine.allocBuffer(4 * a), engine.allocBuffer(2 * a)];
    for (const b of bufs) randomFillSync(b);
    await d.writev(bufs, 8 * a);
    const back = [engine.allocBuffer(3 * a), engine.allocBuffer(4 * a)];
    expect(await d.readv(back, 8 * a)).toBe(7 * a);
    expect(Buffer.concat(back).equals(Buffer.concat(bufs))).toBe(true);
    await d.close();
  });

  it('refuses misaligned O_DIRECT requests up front, with their own code, and writes nothing', async () => {
    const path = tmp.file('align.img');
    const before = randomFillSync(Buffer.alloc(64 * 1024));
    writeFileSync(path, before);
    const f = await engine.openFile(path, { direct: true });
    const a = f.logicalBlockSize;
    const good = engine.allocBuffer(a);
    const cases: Promise<unknown>[] = [
      f.write(good, 1),
      f.read(good, a / 2),
      f.write(engine.allocBuffer(a + 1), 0),
      f.write(engine.allocBuffer(2 * a).subarray(8, 8 + a), 0),
      f.read(Buffer.alloc(100), 0),
      f.writev([good, engine.allocBuffer(a).subarray(0, a - 1)], 0),
    ];
    for (const c of cases) {
      const err = await c.then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(EngineError);
      expect(err).not.toBeInstanceOf(IoError);
      expect((err as EngineError).code).toBe('ERR_VMDISK_ENGINE_MISALIGNED');
    }
    await f.close();
    expect(readFileSync(path).equals(before)).toBe(true);
  });

  it('bufferAligned tells up front whether a buffer suits the file', async () => {
    const path = tmp.file('aligned.img');
    writeFileSync(path, Buffer.alloc(8192));
    const d = await engine.openFile(path, { direct: true });
    const f = await engine.openFile(path);
    const a = d.logicalBlockSize;
    const arena = engine.allocBuffer(2 * a);
    expect(d.bufferAligned(arena)).toBe(true);
    expect(d.bufferAligned(arena.subarray(a))).toBe(true);
    expect(d.bufferAligned(arena.subarray(8))).toBe(false);
    expect(f.bufferAligned(arena.subarray(8))).toBe(true);
    engine.releaseBuffer(arena);
    await d.close();
    await f.close();
  });

  it('a bad fd gives an IoError EBADF with syscall, offset and length', async () => {
    const path = tmp.file('badfd.img');
    writeFileSync(path, Buffer.alloc(8192));
    const f = await engine.openFile(path);
    closeSync(f.fd); // behind the engine's back
    const err = await f.read(Buffer.alloc(4096), 4096).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IoError);
    const io = err as IoError;
    expect(io.code).toBe('ERR_VMDISK_ENGINE_IO');
    expect(io.errno).toBe(9);
    expect(io.errnoName).toBe('EBADF');
    expect(io.syscall).toBe('read');
    expect(io.offset).toBe(4096);
    expect(io.length).toBe(4096);
    const ferr = (await f.fsync().catch((e: unknown) => e)) as IoError;
    expect(ferr.errnoName).toBe('EBADF');
    expect(ferr.syscall).toBe('fsync');
    // Closing it again through the engine reports the same EBADF.
    const cerr = (await f.close().catch((e: unknown) => e)) as IoError;
    expect(cerr.errnoName).toBe('EBADF');
  });

  it('writing a file opened read-only gives an IoError EBADF and changes nothing', async () => {
    const path = tmp.file('ro.img');
    writeFileSync(path, Buffer.alloc(8192, 1));
    const f = await engine.openFile(path, { readOnly: true });
    expect(f.readOnly).toBe(true);
    const err = (await f.write(Buffer.alloc(512, 2), 512).catch((e: unknown) => e)) as IoError;
    expect(err).toBeInstanceOf(IoError);
    expect(err.errnoName).toBe('EBADF');
    expect(err.syscall).toBe('write');
    expect(err.offset).toBe(512);
    expect(err.length).toBe(512);
    const verr = (await f
      .writev([Buffer.alloc(10), Buffer.alloc(10)], 0)
      .catch((e: unknown) => e)) as IoError;
    expect(verr.errnoName).toBe('EBADF');
    expect(verr.syscall).toBe('writev');
    await f.close();
    expect(readFileSync(path).every((b) => b === 1)).toBe(true);
  });

  it('punch-hole and zero-range read back zeros; punch-hole keeps the size; allocate extends', async () => {
    const path = tmp.file('falloc.img');
    const size = 1024 * 1024;
    writeFileSync(path, Buffer.alloc(size, 0xaa));
    const f = await engine.openFile(path);
    await f.fallocate('punch-hole', 64 * 1024, 128 * 1024);
    await f.fallocate('zero-range', 512 * 1024, 4096 * 3);
    expect(await f.size()).toBe(size);
    const buf = Buffer.alloc(size);
    expect(await f.read(buf, 0)).toBe(size);
    for (const [start, end, value] of [
      [0, 64 * 1024, 0xaa],
      [64 * 1024, 192 * 1024, 0],
      [192 * 1024, 512 * 1024, 0xaa],
      [512 * 1024, 512 * 1024 + 12288, 0],
      [512 * 1024 + 12288, size, 0xaa],
    ] as const) {
      expect(buf.subarray(start, end).every((b) => b === value)).toBe(true);
    }
    // The punched range is a hole the filesystem reports.
    expect(await f.seekHole(0)).toBe(64 * 1024);
    expect(await f.seekData(64 * 1024)).toBe(192 * 1024);
    await f.fallocate('allocate', size, 65536);
    expect(await f.size()).toBe(size + 65536);
    expect(await f.seekData(size + 65536)).toBeNull();
    await f.truncate(4096);
    expect(await f.size()).toBe(4096);
    await f.close();
    expect(statSync(path).size).toBe(4096);
  });

  it('fsync and fdatasync complete after writes', async () => {
    const path = tmp.file('sync.img');
    const f = await engine.openFile(path, { create: true });
    const data = randomFillSync(Buffer.alloc(256 * 1024));
    await Promise.all([f.write(data, 0), f.write(data, data.length)]);
    await f.fdatasync();
    await f.fsync();
    await f.close();
    expect(readFileSync(path).equals(Buffer.concat([data, data]))).toBe(true);
  });

  it('requests refused in the middle of a batch settle, and free their slots', async () => {
    const small = await openEngine({ backend, queueDepth: 4 });
    const path = tmp.file('refused.img');
    const ref = randomFillSync(Buffer.alloc(64 * 1024));
    writeFileSync(path, ref);
    const f = await small.openFile(path, { readOnly: true });
    // One JS turn: good reads with writes the kernel refuses (EBADF) between them.
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < 30; i++) {
      calls.push(f.read(Buffer.alloc(1024), i * 1024));
      calls.push(f.write(Buffer.alloc(1024), i * 1024));
    }
    const settled = await Promise.allSettled(calls);
    settled.forEach((s, i) => {
      if (i % 2 === 0) expect(s).toEqual({ status: 'fulfilled', value: 1024 });
      else expect((s as PromiseRejectedResult).reason.errnoName).toBe('EBADF');
    });
    // Had a refused request kept its slot, these would never all complete.
    const bufs = Array.from({ length: 64 }, () => Buffer.alloc(1024));
    await Promise.all(bufs.map((b, i) => f.read(b, i * 1024)));
    expect(Buffer.concat(bufs).equals(ref)).toBe(true);
    await small.close();
  });

  it('more requests than the queue holds wait their turn instead of failing', async () => {
    const small = await openEngine({ backend, queueDepth: 2 });
    const path = tmp.file('queue.img');
    const ref = randomFillSync(Buffer.alloc(1024 * 1024));
    writeFileSync(path, ref);
    const f = await small.openFile(path);
    const bufs = Array.from({ length: 512 }, () => Buffer.alloc(2048));
    const ns = await Promise.all(bufs.map((b, i) => f.read(b, i * 2048)));
    expect(ns.every((n) => n === 2048)).toBe(true);
    expect(Buffer.concat(bufs).equals(ref)).toBe(true);
    await small.close();
  });

  it('close() waits for the I/O in flight, then refuses work with its own code', async () => {
    const e = await openEngine({ backend });
    const path = tmp.file('closing.img');
    const f = await e.openFile(path, { create: true });
    const data = randomFillSync(Buffer.alloc(4096 * 200));
    const writes = Array.from({ length: 200 }, (_, i) =>
      f.write(data.subarray(i * 4096, (i + 1) * 4096), i * 4096),
    );
    const closed = e.close();
    // Everything issued before close() completes.
    await expect(Promise.all(writes)).resolves.toHaveLength(200);
    await closed;
    expect(readFileSync(path).equals(data)).toBe(true);
    const err = (await f.read(Buffer.alloc(10), 0).catch((x: unknown) => x)) as EngineError;
    expect(err.code).toBe('ERR_VMDISK_ENGINE_FILE_CLOSED');
    const oerr = (await e.openFile(path).catch((x: unknown) => x)) as EngineError;
    expect(oerr.code).toBe('ERR_VMDISK_ENGINE_CLOSED');
    expect(() => e.allocBuffer(4096)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_ENGINE_CLOSED' }),
    );
    await e.close(); // again: the same, no error
  });

  it('a file closed with I/O in flight finishes that I/O first', async () => {
    const path = tmp.file('fclose.img');
    const ref = randomFillSync(Buffer.alloc(512 * 1024));
    writeFileSync(path, ref);
    const f = await engine.openFile(path);
    const bufs = Array.from({ length: 64 }, () => Buffer.alloc(8192));
    const reads = bufs.map((b, i) => f.read(b, i * 8192));
    await f.close();
    const ns = await Promise.all(reads);
    expect(ns.every((n) => n === 8192)).toBe(true);
    expect(Buffer.concat(bufs).equals(ref)).toBe(true);
    const err = (await f.size().catch((x: unknown) => x)) as EngineError;
    expect(err.code).toBe('ERR_VMDISK_ENGINE_FILE_CLOSED');
  });

  it('arena buffers are page-aligned and reused after release', () => {
    const a = engine.allocBuffer(10_000);
    expect(a.length).toBe(10_000);
    expect(koffi.address(a) % 4096n).toBe(0n);
    const addr = koffi.address(a);
    expect(engine.ownsBuffer(a)).toBe(true);
    expect(engine.ownsBuffer(a.subarray(0, 4096))).toBe(false);
    engine.releaseBuffer(a);
    expect(engine.ownsBuffer(a)).toBe(false);
    const b = engine.allocBuffer(12_288); // the same page-rounded size class
    expect(koffi.address(b)).toBe(addr);
    // The same memory handed out again: the stale buffer is still not the arena's.
    expect(engine.ownsBuffer(b)).toBe(true);
    expect(engine.ownsBuffer(a)).toBe(false);
    expect(engine.ownsBuffer(Buffer.alloc(4096))).toBe(false);
    expect(() => engine.releaseBuffer(Buffer.alloc(4096))).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_ENGINE_INVALID_ARGUMENT' }),
    );
    engine.releaseBuffer(b);
    expect(() => engine.releaseBuffer(b)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_ENGINE_INVALID_ARGUMENT' }),
    );
  });

  it('bad arguments are rejected (never thrown) with a stable code', async () => {
    const path = tmp.file('args.img');
    writeFileSync(path, Buffer.alloc(4096));
    const f = await engine.openFile(path);
    const bad: (() => Promise<unknown>)[] = [
      () => f.read(Buffer.alloc(1), -1),
      () => f.read(Buffer.alloc(1), 1.5),
      () => f.write('abc' as unknown as Uint8Array, 0),
      () => f.fallocate('shred' as 'allocate', 0, 10),
      () => f.fallocate('allocate', 0, 0),
      () => f.truncate(-4),
    ];
    for (const call of bad) {
      let p: Promise<unknown> | undefined;
      expect(() => {
        p = call();
      }).not.toThrow();
      const err = (await p!.catch((x: unknown) => x)) as EngineError;
      expect(err.code).toBe('ERR_VMDISK_ENGINE_INVALID_ARGUMENT');
    }
    expect(await f.read(Buffer.alloc(0), 0)).toBe(0);
    const nf = (await engine.openFile(tmp.file('missing')).catch((x: unknown) => x)) as IoError;
    expect(nf.errnoName).toBe('ENOENT');
    expect(nf.syscall).toBe('open');
    await f.close();
  });
});

describe('aio backend, buffered files', () => {
  it('sends reads that would block (not in the page cache) to the thread pool, and they are right', async () => {
    const tmp = tempDir();
    const engine = await openEngine({ backend: 'aio' });
    try {
      const path = tmp.file('cold.img');
      const ref = randomFillSync(Buffer.alloc(2 * 1024 * 1024));
      writeFileSync(path, Buffer.alloc(ref.length));
      // Writing through O_DIRECT leaves the page cache of the file empty.
      const d = await engine.openFile(path, { direct: true });
      const staging = engine.allocBuffer(ref.length);
      ref.copy(staging);
      await d.write(staging, 0);
      await d.close();
      const f = await engine.openFile(path);
      const bufs = Array.from({ length: 64 }, () => Buffer.alloc(32 * 1024));
      const ns = await Promise.all(bufs.map((b, i) => f.read(b, i * 32 * 1024)));
      expect(ns.every((n) => n === 32 * 1024)).toBe(true);
      expect(Buffer.concat(bufs).equals(ref)).toBe(true);
      const be = (engine as unknown as { be: { nowaitFallbacks: number } }).be;
      expect(be.nowaitFallbacks).toBeGreaterThan(0);
      await f.close();
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });
});

describe('io_uring backend, registered buffers', () => {
  it('registers arena slabs and reads/writes them with READ_FIXED/WRITE_FIXED, correctly', async () => {
    const tmp = tempDir();
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      const be = (
        engine as unknown as {
          be: { fixedIos: number; info: { bufferTable: boolean; registeredBuffers: number } };
        }
      ).be;
      expect(be.info.bufferTable).toBe(true);
      const path = tmp.file('fixed.img');
      const f = await engine.openFile(path, { create: true, direct: true });
      const a = f.logicalBlockSize;
      const small = randomFillSync(engine.allocBuffer(8 * a));
      const large = randomFillSync(engine.allocBuffer(2 * 1024 * 1024)); // a slab of its own
      expect(be.info.registeredBuffers).toBe(2);
      await f.write(small, 0);
      await f.write(large, 8 * a);
      // Plain memory next to it still works (through READ, not READ_FIXED).
      const plain = Buffer.alloc(8 * a + a);
      const plainAligned = plain.subarray(a - (koffiAddress(plain) % a) || a).subarray(0, 8 * a);
      const before = be.fixedIos;
      const back = engine.allocBuffer(8 * a);
      expect(await f.read(back, 0)).toBe(8 * a);
      expect(back.equals(small)).toBe(true);
      expect(be.fixedIos).toBe(before + 1);
      expect(await f.read(plainAligned, 0)).toBe(8 * a);
      expect(plainAligned.equals(small)).toBe(true);
      expect(be.fixedIos).toBe(before + 1);
      const big = engine.allocBuffer(2 * 1024 * 1024);
      expect(await f.read(big, 8 * a)).toBe(big.length);
      expect(big.equals(large)).toBe(true);
      await f.close();
      expect(readFileSync(path).equals(Buffer.concat([small, large]))).toBe(true);
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });

  it('a buffered file: reads into registered buffers are fixed, writes from them are not (the page-cache copy from a fixed buffer is slower)', async () => {
    const tmp = tempDir();
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      const be = (engine as unknown as { be: { fixedIos: number } }).be;
      const f = await engine.openFile(tmp.file('buffered.img'), { create: true });
      const MiB = 1024 * 1024;
      const data = randomFillSync(engine.allocBuffer(MiB));
      const before = be.fixedIos;
      await f.write(data, MiB);
      expect(be.fixedIos).toBe(before);
      const back = engine.allocBuffer(MiB);
      expect(await f.read(back, MiB)).toBe(MiB);
      expect(be.fixedIos).toBe(before + 1);
      expect(back.equals(data)).toBe(true);
      await f.close();
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });
});

describe('the buffer arena gives memory back', () => {
  it('keeps free blocks for reuse while busy, and gives the surplus back after the delay', async () => {
    const arena = new BufferArena({}, ARENA_CACHE_BYTES, 50);
    const MiB = 1024 * 1024;
    // A burst: 64 large buffers (a slab each) and 2048 small ones (16 slabs of 4 MiB).
    const large = Array.from({ length: 64 }, () => arena.alloc(2 * MiB).fill(1));
    const small = Array.from({ length: 2048 }, () => arena.alloc(32 * 1024).fill(2));
    const burst = arena.allocatedBytes;
    expect(burst).toBeGreaterThan(190 * MiB);
    for (const b of [...large, ...small]) arena.release(b);
    // Right after it, a second burst reuses the same memory: no slab was made or dropped.
    const reused = Array.from({ length: 64 }, () => arena.alloc(2 * MiB));
    expect(arena.allocatedBytes).toBe(burst);
    expect(reused[0]!.buffer).toBe(large[63]!.buffer);
    for (const b of reused) arena.release(b);
    // Once the cache has been over its size for the delay, the surplus goes back: what is
    // left is the cache, and the slab small blocks are carved from now (4 MiB).
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(arena.cachedBytes).toBeLessThanOrEqual(ARENA_CACHE_BYTES + 4 * MiB);
    expect(arena.allocatedBytes).toBeLessThanOrEqual(ARENA_CACHE_BYTES + 4 * MiB + 16 * 4096);
    // The memory is freed, not left to the garbage collector: a dropped buffer is detached.
    expect(large.filter((b) => b.length === 0).length).toBeGreaterThan(50);
    // And the arena still works, reusing what it kept.
    const again = arena.alloc(32 * 1024);
    expect(again.length).toBe(32 * 1024);
    arena.release(again);
  });

  it('gives the whole cache back once no buffer has been asked for a while', async () => {
    const arena = new BufferArena({}, ARENA_CACHE_BYTES, 50, 100);
    const MiB = 1024 * 1024;
    // Less than the cache keeps while busy: 4 large buffers and 64 small ones.
    const bufs = [
      ...Array.from({ length: 4 }, () => arena.alloc(2 * MiB).fill(1)),
      ...Array.from({ length: 64 }, () => arena.alloc(32 * 1024).fill(2)),
    ];
    for (const b of bufs) arena.release(b);
    expect(arena.cachedBytes).toBe(4 * 2 * MiB + 64 * 32 * 1024);
    await vi.waitFor(() => expect(arena.allocatedBytes).toBe(0), { timeout: 5000 });
    expect(arena.cachedBytes).toBe(0);
    expect(bufs.every((b) => b.length === 0)).toBe(true);
    // And it still works, from a new slab.
    const again = arena.alloc(32 * 1024);
    expect(again.length).toBe(32 * 1024);
    arena.release(again);
    arena.dispose();
  });

  it('io_uring: a slab given back is unregistered, its slot reused, fixed I/O still right', async () => {
    const tmp = tempDir();
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      const { be, arena } = engine as unknown as {
        be: { fixedIos: number; info: { registeredBuffers: number } };
        arena: { trim(): void };
      };
      const path = tmp.file('reuse.img');
      const f = await engine.openFile(path, { create: true, direct: true });
      const MiB = 1024 * 1024;
      const registered = be.info.registeredBuffers;
      for (let round = 0; round < 3; round++) {
        // 24 MiB of 2 MiB buffers at once: more than the cache keeps.
        const bufs = Array.from({ length: 12 }, () => randomFillSync(engine.allocBuffer(2 * MiB)));
        // The cache's 8 (round > 0) and new ones: 12 registered.
        expect(be.info.registeredBuffers).toBe(registered + 12);
        await Promise.all(bufs.map((b, i) => f.write(b, i * 2 * MiB)));
        const back = engine.allocBuffer(2 * MiB);
        const before = be.fixedIos;
        await f.read(back, 22 * MiB);
        expect(be.fixedIos).toBe(before + 1);
        expect(back.equals(bufs[11]!)).toBe(true);
        engine.releaseBuffer(back);
        for (const b of bufs) engine.releaseBuffer(b);
        // The trim the arena runs after its delay: beyond the 16 MiB cache (8 of them, and
        // the read's one), slabs are unregistered.
        arena.trim();
        expect(be.info.registeredBuffers).toBe(registered + 8);
      }
      await f.close();
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });
});

function koffiAddress(b: Uint8Array): number {
  return Number(koffi.address(b));
}

describe('asynchronous system calls beyond koffi’s limit', () => {
  it('queues hundreds of concurrent seekData/fallocate calls instead of refusing them', async () => {
    const engine = await openEngine({ backend: 'threadpool' });
    const dir = mkdtempSync(join(tmpdir(), 'vmdisk-engine-async-'));
    const file = await engine.openFile(join(dir, 'f'), { create: true });
    try {
      await file.truncate(4 << 20);
      await file.write(Buffer.alloc(4096, 1), 1 << 20);
      const calls = Array.from({ length: 400 }, (_, i) =>
        i % 2 ? file.seekData(0) : file.fallocate('zero-range', (2 << 20) + i * 4096, 4096),
      );
      const results = await Promise.all(calls);
      for (let i = 1; i < results.length; i += 2) expect(results[i]).toBe(1 << 20);
    } finally {
      await file.close();
      await engine.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
