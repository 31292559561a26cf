import { describe, expect, it } from 'vitest';
import { GraphLock } from '../src/graph-lock.ts';
import { BlockGraph } from '../src/index.ts';

describe('graph lock and drained sections', () => {
  it('admits no request during nested drained sections, until the outermost one ends', async () => {
    const g = new BlockGraph();
    await g.add({ driver: 'null-co', 'node-name': 'n', size: 1 << 20, 'latency-ns': 5_000_000 });
    const b = await g.createBackend('n');
    const inFlight = Array.from({ length: 10 }, (_, i) => b.read(i * 512, Buffer.alloc(512)));
    expect(g.lock.inFlight).toBe(10);
    await g.drainedBegin();
    // Drained: everything that was in flight has finished.
    expect(g.lock.inFlight).toBe(0);
    await Promise.all(inFlight);
    await g.drainedBegin();
    expect(g.lock.drainDepth).toBe(2);
    let done = 0;
    const waiting = Array.from({ length: 5 }, (_, i) =>
      b.read(i * 512, Buffer.alloc(512)).then(() => done++),
    );
    // A graph change inside a drained section does not wait for itself.
    await g.add({ driver: 'null-co', 'node-name': 'm', size: 4096 });
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(done).toBe(0);
    expect(g.lock.inFlight).toBe(0);
    g.drainedEnd();
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(done).toBe(0);
    g.drainedEnd();
    await Promise.all(waiting);
    expect(done).toBe(5);
    expect(() => g.drainedEnd()).toThrow();
    await g.close();
  });

  it('serialises graph changes and runs each with nothing in flight', async () => {
    const lock = new GraphLock();
    const seen: string[] = [];
    expect(lock.tryRead()).toBe(true);
    const change1 = lock.write(async () => {
      seen.push(`c1:${lock.inFlight}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
      seen.push('c1-end');
    });
    const change2 = lock.write(() => {
      seen.push(`c2:${lock.inFlight}`);
    });
    await new Promise((resolve) => setImmediate(resolve));
    // The first change is waiting for the request in flight: nothing new is admitted.
    expect(lock.drainDepth).toBe(1);
    expect(lock.tryRead()).toBe(false);
    const reader = lock.read().then(() => {
      seen.push('r');
      lock.releaseRead();
    });
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(seen).toEqual([]);
    lock.releaseRead();
    await Promise.all([change1, change2, reader]);
    // Change 1 ran alone with nothing in flight, change 2 after it, also with nothing in
    // flight; the reader got in between or after, never during a change.
    expect(seen.slice(0, 2)).toEqual(['c1:0', 'c1-end']);
    expect(seen).toContain('c2:0');
    expect(seen).toContain('r');
    expect(seen).toHaveLength(4);
  });
});
