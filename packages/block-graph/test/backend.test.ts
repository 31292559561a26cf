// A BlockBackend has the shape of @vmdisk/nbd's ExportTarget (no import between the two:
// the interface is copied here, as the app relies on it structurally).

import { join } from 'node:path';
import { MemoryTarget, NbdServer } from '@vmdisk/nbd';
import { afterAll, describe, expect, it } from 'vitest';
import { type BlockBackend, BlockGraph } from '../src/index.ts';
import { pattern, tempDir } from './helpers.ts';

interface WriteFlags {
  fua?: boolean;
}
interface WriteZeroesFlags extends WriteFlags {
  noHole?: boolean;
  fastZero?: boolean;
}
interface Extent {
  length: number;
  hole: boolean;
  zero: boolean;
  depth?: number;
}
interface ExportTarget {
  size(): number;
  read(offset: number, buf: Uint8Array): Promise<void>;
  write?(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void>;
  flush?(): Promise<void>;
  trim?(offset: number, length: number, flags: WriteFlags): Promise<void>;
  writeZeroes?(offset: number, length: number, flags: WriteZeroesFlags): Promise<void>;
  blockStatus?(offset: number, length: number): Promise<Extent[]>;
  cache?(offset: number, length: number): Promise<void>;
  allocBuffer?(length: number): Uint8Array;
  releaseBuffer?(buf: Uint8Array): void;
  readonly nativeFua?: boolean;
  readonly multiConnSafe?: boolean;
  readonly reportsDepth?: boolean;
  readonly blockSize?: { minimum: number; preferred: number; maximum: number };
}

const tmp = tempDir();
afterAll(() => tmp.cleanup());

describe('BlockBackend as an ExportTarget', () => {
  it('is assignable to the ExportTarget interface and serves it', async () => {
    const path = tmp.file('export.img', pattern(1, 0, 1 << 20));
    const g = new BlockGraph();
    await g.add({
      driver: 'raw',
      'node-name': 'disk',
      discard: 'unmap',
      file: { driver: 'file', filename: path, cache: { direct: true } },
    });
    const backend: BlockBackend = await g.createBackend('disk', { write: true });
    const target: ExportTarget = backend;
    expect(target.size()).toBe(1 << 20);
    expect(target.blockSize!.minimum).toBeGreaterThanOrEqual(512);
    expect(target.reportsDepth).toBe(true);
    const buf = target.allocBuffer!(65536);
    await target.read(4096, buf);
    expect(Buffer.compare(buf, pattern(1, 4096, 65536))).toBe(0);
    buf.fill(3);
    await target.write!(4096, buf, { fua: true });
    target.releaseBuffer!(buf);
    await target.trim!(65536 * 4, 65536, {});
    await target.writeZeroes!(65536 * 8, 65536, { noHole: true });
    await target.flush!();
    await target.cache!(0, 1 << 20);
    const ext = await target.blockStatus!(0, 1 << 20);
    expect(ext.reduce((n, e) => n + e.length, 0)).toBe(1 << 20);
    expect(ext.find((e) => e.hole)).toMatchObject({ length: 65536, zero: true, depth: 1 });
    // Errors carry errnoName for the server to answer with.
    await expect(target.read(1 << 20, Buffer.alloc(1))).rejects.toMatchObject({
      errnoName: 'EINVAL',
    });
    const ro = await g.createBackend('disk', { shareWrite: true });
    await expect((ro as ExportTarget).write!(0, Buffer.alloc(1), {})).rejects.toMatchObject({
      errnoName: 'EPERM',
    });
    await g.close();
  });
});

describe('request buffers of a graph with no file under it', () => {
  // They come from the engine's arena as a file node's do, and a released one is handed out
  // again: a new Buffer per request (its pages faulted in at first touch, then left to the
  // garbage collector) cost a null-co export two thirds of its 1 MiB write throughput.
  async function reuses(g: BlockGraph, node: string): Promise<void> {
    const backend = await g.createBackend(node, { write: true });
    try {
      const a = backend.allocBuffer(1 << 20);
      const memory = a.buffer;
      const at = a.byteOffset;
      await backend.write(0, a);
      backend.releaseBuffer(a);
      const b = backend.allocBuffer(1 << 20);
      backend.releaseBuffer(b);
      // (Identity as a boolean: a failure's diff of two MiB-sized ArrayBuffers takes minutes.)
      expect(b.buffer === memory).toBe(true);
      expect(b.byteOffset).toBe(at);
      // An arena slab (page-aligned within a larger ArrayBuffer), not a Buffer of its own.
      expect(b.buffer.byteLength).toBeGreaterThan(1 << 20);
    } finally {
      await backend.close();
    }
  }

  it('null-co', async () => {
    const g = new BlockGraph();
    try {
      await g.add({ driver: 'null-co', 'node-name': 'null', size: 4 << 20 });
      await reuses(g, 'null');
    } finally {
      await g.close();
    }
  });

  it('nbd (a disk of another server)', async () => {
    const server = new NbdServer();
    const g = new BlockGraph();
    try {
      const sock = join(tmp.dir, 'remote.sock');
      await server.listen({ path: sock });
      server.addExport({ name: 'remote', target: new MemoryTarget(4 << 20), writable: true });
      await g.add({
        driver: 'nbd',
        'node-name': 'remote',
        server: { type: 'unix', path: sock },
        export: 'remote',
      });
      await reuses(g, 'remote');
    } finally {
      await g.close();
      await server.close();
    }
  });
});
