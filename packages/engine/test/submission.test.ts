// The io_uring backend's submission path: how many io_uring_enter calls a turn's requests
// take, counted by the backend (real ring, real files).
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import koffi from 'koffi';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Engine, type EngineFile, openEngine } from '../src/index.ts';
import { bufferedIoBlocks } from '../src/native.ts';
import { tempDir } from './helpers.ts';

interface Counters {
  enters: number;
}

describe('io_uring submission', () => {
  const tmp = tempDir();
  let engine: Engine;
  let be: Counters;
  let file: EngineFile;
  const data = randomFillSync(Buffer.alloc(64 * 1024));

  beforeAll(async () => {
    engine = await openEngine({ backend: 'io_uring' });
    be = (engine as unknown as { be: Counters }).be;
    writeFileSync(tmp.file('a.img'), data);
    file = await engine.openFile(tmp.file('a.img'));
  });

  afterAll(async () => {
    await engine.close();
    tmp.cleanup();
  });

  it('requests issued at different promise depths of one turn share one io_uring_enter', async () => {
    const bufs = Array.from({ length: 4 }, () => Buffer.alloc(4096));
    const before = be.enters;
    const read = (i: number): Promise<number> => file.read(bufs[i]!, i * 4096);
    // Issued at once, one promise hop later, and two async-function hops later: what a
    // caller's continuation chain of mixed depth does within one turn.
    const all = Promise.all([
      read(0),
      Promise.resolve().then(() => read(1)),
      (async () => {
        await null;
        await null;
        return read(2);
      })(),
      (async () => {
        await read(0);
        return 0;
      })().then(() => 0),
    ]);
    queueMicrotask(() => queueMicrotask(() => void read(3)));
    await all;
    expect(be.enters - before).toBe(1);
    for (let i = 0; i < 3; i++) {
      expect(bufs[i]!.equals(data.subarray(i * 4096, (i + 1) * 4096))).toBe(true);
    }
  });

  it('an O_DIRECT request goes to the kernel at once, with what waits before it', async () => {
    const d = await engine.openFile(tmp.file('a.img'), { direct: true });
    try {
      const a = d.logicalBlockSize;
      const bufs = Array.from({ length: 16 }, () => engine.allocBuffer(a));
      const before = be.enters;
      // A buffered read first: it waits for the turn's end, then goes with the first
      // O_DIRECT read; each O_DIRECT read is one enter.
      const buffered = file.read(Buffer.alloc(4096), 0);
      const reads = bufs.map((b, i) => d.read(b, (i % 8) * a));
      expect(be.enters - before).toBe(16);
      await buffered;
      const n = await Promise.all(reads);
      expect(be.enters - before).toBe(16);
      expect(n).toEqual(bufs.map(() => a));
      expect(bufs[3]!.equals(data.subarray(3 * a, 4 * a))).toBe(true);
    } finally {
      await d.close();
    }
  });

  it('the continuations of a batch of completions submit together', async () => {
    const bufs = Array.from({ length: 8 }, () => Buffer.alloc(4096));
    await Promise.all(bufs.map((b, i) => file.read(b, i * 4096)));
    const before = be.enters;
    // Eight chains whose second request is issued at different depths after the first
    // completes: the second requests go in one enter.
    await Promise.all(
      bufs.map(async (b, i) => {
        await file.read(b, i * 4096);
        for (let d = 0; d < i; d++) await null;
        await file.read(b, ((i + 8) % 16) * 4096);
      }),
    );
    expect(be.enters - before).toBe(2);
  });
});

describe('buffered requests that always block', () => {
  it('are told apart by file type: regular files on tmpfs and ext4, not devices', async () => {
    const tmp = tempDir('/dev/shm');
    try {
      writeFileSync(tmp.file('a.img'), Buffer.alloc(4096));
      const fd = openSync(tmp.file('a.img'), 'r+');
      const dev = openSync('/dev/null', 'r+');
      try {
        // tmpfs: its SEEK_DATA/SEEK_HOLE walk the page cache (the thread pool's).
        expect(bufferedIoBlocks(fd)).toEqual({ reads: true, writes: true, seeks: true });
        // /dev/null lives on devtmpfs (tmpfs's magic number) but is no regular file.
        expect(bufferedIoBlocks(dev)).toEqual({ reads: false, writes: false, seeks: false });
      } finally {
        closeSync(fd);
        closeSync(dev);
      }
    } finally {
      tmp.cleanup();
    }
  });

  it('io_uring sends large reads to io-wq at once (IOSQE_ASYNC) but not writes (io-wq orders those per file only then), and they are right; O_DIRECT ones neither', async () => {
    const tmp = tempDir('/dev/shm');
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      const be = (engine as unknown as { be: { asyncIos: number } }).be;
      const path = tmp.file('w.img');
      const f = await engine.openFile(path, { create: true });
      const piece = 128 * 1024; // over the inline limit
      const data = randomFillSync(Buffer.alloc(16 * piece));
      const before = be.asyncIos;
      // Many in flight, plain and vectored, arena and heap buffers.
      await Promise.all(
        Array.from({ length: 16 }, (_, i) => {
          const part = data.subarray(i * piece, (i + 1) * piece);
          if (i % 3 === 0) return f.writev([part.subarray(0, 100), part.subarray(100)], i * piece);
          const buf = i % 3 === 1 ? engine.allocBuffer(piece) : Buffer.alloc(piece);
          part.copy(buf);
          return f.write(buf, i * piece);
        }),
      );
      // Writes are not flagged: io-wq hashes them by inode only when they are not.
      expect(be.asyncIos - before).toBe(0);
      const back = Buffer.alloc(data.length);
      expect(await f.read(back, 0)).toBe(data.length);
      expect(back.equals(data)).toBe(true);
      expect(readFileSync(path).equals(data)).toBe(true);
      // The read too (tmpfs has no non-blocking buffered reads).
      expect(be.asyncIos - before).toBe(1);
      await f.close();
      // O_DIRECT requests are never punted up front.
      const d = await engine.openFile(path, { direct: true });
      const aligned = engine.allocBuffer(8192);
      await d.write(aligned, 0);
      expect(await d.read(aligned, 8192)).toBe(8192);
      expect(aligned.equals(data.subarray(8192, 16384))).toBe(true);
      await d.close();
      expect(be.asyncIos - before).toBe(1);
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });

  it('the small ones are done inline with pread/pwrite, settled after the issuing call returns', async () => {
    const tmp = tempDir('/dev/shm');
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      const be = (engine as unknown as { be: { asyncIos: number; inlineIos: number } }).be;
      const path = tmp.file('s.img');
      const f = await engine.openFile(path, { create: true });
      const data = randomFillSync(Buffer.alloc(32 * 4096));
      const inline0 = be.inlineIos;
      const async0 = be.asyncIos;
      let settled = 0;
      const writes = Array.from({ length: 32 }, (_, i) => {
        const part = data.subarray(i * 4096, (i + 1) * 4096);
        // Vectored requests take io-wq (one buffer each is what goes inline).
        const p =
          i % 4 === 0
            ? f.writev([part.subarray(0, 512), part.subarray(512)], i * 4096)
            : f.write(Buffer.from(part), i * 4096);
        return p.then(() => settled++);
      });
      expect(settled).toBe(0); // never on the issuer's stack
      await Promise.all(writes);
      expect(be.inlineIos - inline0).toBe(24);
      expect(be.asyncIos - async0).toBe(0); // the vectored writes: io-wq, unflagged
      const back = Buffer.alloc(4096);
      expect(await f.read(back, 5 * 4096)).toBe(4096);
      expect(back.equals(data.subarray(5 * 4096, 6 * 4096))).toBe(true);
      expect(be.inlineIos - inline0).toBe(25);
      // A loop where each completion issues the next never starves the event loop.
      let timerFired = false;
      const timer = setTimeout(() => {
        timerFired = true;
      }, 1);
      const one = Buffer.alloc(4096);
      for (let i = 0; !timerFired; i++) await f.write(one, (i % 32) * 4096);
      clearTimeout(timer);
      await f.write(Buffer.from(data.subarray(0, 32 * 4096)), 0);
      // Past the end: a short read, as pread gives it.
      expect(await f.read(Buffer.alloc(8192), data.length - 4096)).toBe(4096);
      expect(readFileSync(path).equals(data)).toBe(true);
      await f.close();
    } finally {
      await engine.close();
      tmp.cleanup();
    }
  });

  it('inlineSeeks: seeks made at once where the filesystem looks them up, else on the thread pool', async () => {
    const usleep = koffi.load('libc.so.6').func('int usleep(unsigned int usec)');
    const pool = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
    const shm = tempDir('/dev/shm');
    // os.tmpdir(): ext4 on these machines (an extent lookup).
    const tmp = tempDir();
    const engine = await openEngine({ backend: 'io_uring' });
    try {
      for (const path of [shm.file('a.img'), tmp.file('a.img')]) {
        writeFileSync(path, Buffer.alloc(8192, 1));
        const fd = openSync(path, 'r');
        const { seeks } = bufferedIoBlocks(fd);
        closeSync(fd);
        for (const inlineSeeks of [false, true]) {
          const f = await engine.openFile(path, { inlineSeeks });
          // Every thread of the pool asleep: a seek sent there waits for one to wake.
          const order: string[] = [];
          const sleeps = Array.from(
            { length: pool },
            () =>
              new Promise<void>((resolve) =>
                usleep.async(200_000, () => {
                  order.push('sleep');
                  resolve();
                }),
              ),
          );
          const hole = f.seekHole(0).then((r) => {
            order.push('seek');
            return r;
          });
          expect(await hole).toBe(8192);
          await Promise.all(sleeps);
          // Made at once: before any sleep ended; through the pool: after one.
          const atOnce = inlineSeeks && !seeks;
          if (atOnce) expect(order.indexOf('seek')).toBe(0);
          else expect(order.indexOf('seek')).toBeGreaterThan(0);
          await f.close();
        }
      }
      // tmpfs always through the pool; this test means something only where /tmp is not.
      const fd = openSync(tmp.file('a.img'), 'r');
      expect(bufferedIoBlocks(fd).seeks).toBe(false);
      closeSync(fd);
    } finally {
      await engine.close();
      shm.cleanup();
      tmp.cleanup();
    }
  });
});
