// A block job at full speed gives way to the graph's users (src/jobs/give-way.ts): while
// they have requests it keeps one operation in flight and rests longer than it worked.
import { describe, expect, it } from 'vitest';
import { GraphLock } from '../src/graph-lock.ts';
import { type BlockDriver, BlockGraph } from '../src/index.ts';
import { GiveWay, REST_PER_WORK } from '../src/jobs/give-way.ts';
import { mirrorToReady } from './helpers.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

describe('GiveWay', () => {
  it('rests only after the users had requests, REST_PER_WORK times the stretch, at most 100 ms of it', () => {
    const lock = new GraphLock();
    const gw = new GiveWay(lock);
    expect(gw.rest(1000)).toBe(0);
    // A job's own request is no user's.
    expect(lock.tryReadForJob()).toBe(true);
    lock.releaseRead();
    expect(gw.usersActive).toBe(false);
    expect(gw.rest(1010)).toBe(0);
    expect(lock.tryRead()).toBe(true);
    lock.releaseRead();
    expect(gw.usersActive).toBe(true);
    // The stretch began at the last look (1010).
    expect(gw.rest(1015)).toBe(5 * REST_PER_WORK);
    expect(gw.usersActive).toBe(false);
    // The next stretch begins when the rest ends.
    expect(lock.tryRead()).toBe(true);
    lock.releaseRead();
    expect(gw.rest(1015 + 5 * REST_PER_WORK + 3)).toBe(3 * REST_PER_WORK);
    // A long wait (a paused job) is not work.
    expect(lock.tryRead()).toBe(true);
    lock.releaseRead();
    expect(gw.rest(60_000)).toBe(100 * REST_PER_WORK);
  });
});

/** A protocol that discards writes and counts how many were under way at once. */
function countingTarget() {
  const seen = { writes: 0, active: 0, most: 0 };
  const driver: BlockDriver = {
    name: 'counting',
    async open() {
      return {
        size: () => SIZE,
        async pread(buf: Uint8Array) {
          buf.fill(0);
        },
        async pwrite() {
          seen.writes++;
          seen.most = Math.max(seen.most, ++seen.active);
          await new Promise((r) => setTimeout(r, 1));
          seen.active--;
        },
      };
    },
  };
  return { driver, seen };
}

/** Mirrors a 16 MiB null-co source into the counting target; `user` runs meanwhile. */
async function mirror(user: boolean) {
  const { driver, seen } = countingTarget();
  const graph = new BlockGraph({ drivers: [driver] });
  let userReads = 0;
  let stop = false;
  try {
    // Each request of the source ends on a timer, as a file's do on the engine's completion.
    await graph.add({
      driver: 'null-co',
      'node-name': 'src',
      size: SIZE,
      'read-zeroes': false,
      'latency-ns': 100_000,
    });
    await graph.add({ driver: 'counting', 'node-name': 'tgt' });
    const backend = await graph.createBackend('src');
    const reader = (async () => {
      const buf = Buffer.alloc(4096);
      while (user && !stop) {
        await backend.read((userReads % 4096) * 4096, buf);
        userReads++;
      }
    })();
    const t0 = performance.now();
    const bj = await mirrorToReady(graph, { device: 'src', target: 'tgt' });
    const ms = performance.now() - t0;
    stop = true;
    await reader;
    bj.job.cancel();
    await bj.job.wait().catch(() => {});
    return { ...seen, userReads, ms };
  } finally {
    await graph.close();
  }
}

describe('a block job at full speed', () => {
  it('runs its operations side by side when no user has requests', async () => {
    const r = await mirror(false);
    expect(r.writes).toBe(16);
    expect(r.most).toBeGreaterThan(1);
  });

  it('keeps one operation in flight and rests while a user reads', async () => {
    const alone = await mirror(false);
    const r = await mirror(true);
    expect(r.writes).toBe(16);
    expect(r.most).toBe(1);
    expect(r.userReads).toBeGreaterThan(100);
    // 16 operations of >= 1 ms each, one at a time, and longer at rest after each.
    expect(r.ms).toBeGreaterThan(16 * (1 + REST_PER_WORK));
    expect(r.ms).toBeGreaterThan(alone.ms * 2);
  });
});
