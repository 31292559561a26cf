// A drained section waiting for requests in flight is an ao: it shows in liveAos() while it
// waits, with its kind, and is gone once the requests finish.
import { assertNoLiveAos, liveAos } from '@vmdisk/ao';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';

afterEach(() => assertNoLiveAos());

describe('drain as an ao', () => {
  it('is live while a slow request is in flight, and completes after it', async () => {
    const graph = new BlockGraph();
    try {
      await graph.add({
        driver: 'null-co',
        'node-name': 'slow',
        size: 1 << 20,
        'latency-ns': 200_000_000,
      });
      const disk = await graph.createBackend('slow');
      const read = disk.read(0, Buffer.alloc(4096));
      await new Promise((r) => setImmediate(r));
      const drained = graph.drainedBegin();
      expect(liveAos().map((a) => a.kind)).toEqual(['block-graph.drain']);
      await read;
      await drained;
      expect(liveAos()).toEqual([]);
      graph.drainedEnd();
      await disk.close();
    } finally {
      await graph.close();
    }
  });

  it('needs no ao when nothing is in flight', async () => {
    const graph = new BlockGraph();
    try {
      const drained = graph.drainedBegin();
      expect(liveAos()).toEqual([]);
      await drained;
      graph.drainedEnd();
    } finally {
      await graph.close();
    }
  });
});
