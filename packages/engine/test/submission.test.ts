// The io_uring backend's submission path: how many io_uring_enter calls a turn's requests
// take, counted by the backend (real ring, real files).
import { randomFillSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Engine, type EngineFile, openEngine } from '../src/index.ts';
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
