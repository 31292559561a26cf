// I/O accounting per node (QEMU's BlockAcctStats): each request a parent makes counts once
// at the node it reaches, by type, with its bytes; the node's own inner requests (FUA's
// flush, detect-zeroes' write-zeroes, a sparse read's data) do not count again.

import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph, LATENCY_BUCKETS } from '../src/index.ts';
import { pattern, tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

async function rawDisk(options: Record<string, unknown> = {}) {
  const path = tmp.file(`stats-${Math.random()}.img`, pattern(1, 0, 1 << 20));
  const g = new BlockGraph();
  await g.add({
    driver: 'raw',
    'node-name': 'disk',
    discard: 'unmap',
    ...options,
    file: { driver: 'file', 'node-name': 'proto', filename: path },
  });
  return { g, backend: await g.createBackend('disk', { write: true }) };
}

describe('node I/O accounting', () => {
  it('counts requests by type, bytes, latency and the highest offset written', async () => {
    const { g, backend } = await rawDisk();
    const s = g.nodeStats('disk');
    expect(s.idleTimeNs()).toBeUndefined();
    const buf = Buffer.alloc(4096, 7);
    await backend.read(0, buf);
    await backend.read(8192, buf);
    await backend.write(65536, buf);
    await backend.write(0, buf, { fua: true });
    await backend.writeZeroes(1 << 19, 65536);
    await backend.trim(1 << 18, 65536);
    await backend.flush();
    const read = s.counters('read');
    expect(read).toMatchObject({ operations: 2, bytes: 8192, failed: 0, invalid: 0, inFlight: 0 });
    expect(read.latency).toHaveLength(LATENCY_BUCKETS.length + 1);
    expect(read.latency.reduce((a, b) => a + b, 0)).toBe(2);
    expect(read.totalTimeNs).toBeGreaterThan(0);
    // The FUA write is one write (its flush is the node's own).
    expect(s.counters('write')).toMatchObject({ operations: 2, bytes: 8192 });
    expect(s.counters('flush')).toMatchObject({ operations: 1 });
    expect(s.counters('zero')).toMatchObject({ operations: 1, bytes: 65536 });
    expect(s.counters('discard')).toMatchObject({ operations: 1, bytes: 65536 });
    expect(s.wrHighestOffset).toBe((1 << 19) + 65536);
    expect(s.idleTimeNs()).toBeGreaterThanOrEqual(0);
    // The protocol node below counts what the raw node asked of it.
    const proto = g.nodeStats('proto');
    expect(proto.counters('read')).toMatchObject({ operations: 2, bytes: 8192 });
    expect(proto.counters('write').operations).toBe(2);
    expect(proto.counters('flush').operations).toBeGreaterThanOrEqual(2);
    await g.close();
  });

  it('counts refused requests as invalid and failed ones as failed', async () => {
    const { g, backend } = await rawDisk();
    const s = g.nodeStats('disk');
    await expect(backend.read(1 << 20, Buffer.alloc(512))).rejects.toThrow();
    await expect(backend.write(1 << 20, Buffer.alloc(512))).rejects.toThrow();
    expect(s.counters('read')).toMatchObject({ operations: 0, invalid: 1, failed: 0 });
    expect(s.counters('write')).toMatchObject({ operations: 0, invalid: 1, failed: 0 });
    expect(s.wrHighestOffset).toBe(0);
    await g.close();
  });

  it('counts a zero write detected as one write, and a sparse read as one read', async () => {
    const { g, backend } = await rawDisk({ 'detect-zeroes': 'on' });
    const s = g.nodeStats('disk');
    await backend.write(0, Buffer.alloc(65536));
    expect(s.counters('write')).toMatchObject({ operations: 1, bytes: 65536 });
    expect(s.counters('zero').operations).toBe(0);
    await backend.readSparse(0, 131072, (n) => Buffer.alloc(n));
    expect(s.counters('read')).toMatchObject({ operations: 1, bytes: 131072 });
    await g.close();
  });
});
