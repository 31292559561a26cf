// Block status with and without want_zero: a file's holes are looked up (SEEK_DATA) only
// when zeros are wanted exactly; a format's own zero clusters are reported either way.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { graphPerTest } from './helpers.ts';

const t = graphPerTest('vmdisk-want-zero-');

describe('blockStatus wantZero', () => {
  it('raw over a sparse file: holes with wantZero, plain data without', async () => {
    const path = join(t.dir, 'sparse.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', path, '4M']);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 1 1M 64k', path]);
    await t.graph.add({
      driver: 'raw',
      'node-name': 'd0',
      file: { driver: 'file', filename: path },
    });
    const disk = await t.graph.createBackend('d0');
    // (qemu-img create allocates the first 4 KiB of a raw file.)
    expect(await disk.blockStatus(0, 4 << 20)).toEqual([
      { length: 4096, hole: false, zero: false, depth: 1 },
      { length: (1 << 20) - 4096, hole: true, zero: true, depth: 1 },
      { length: 64 << 10, hole: false, zero: false, depth: 1 },
      { length: (3 << 20) - (64 << 10), hole: true, zero: true, depth: 1 },
    ]);
    expect(await disk.blockStatus(0, 4 << 20, { wantZero: false })).toEqual([
      { length: 4 << 20, hole: false, zero: false, depth: 1 },
    ]);
    await disk.close();
  });

  it('raw: a data region seen once is data until a discard or write-zeroes punches it', async () => {
    const path = join(t.dir, 'full.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', path, '4M']);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4M', path]);
    await t.graph.add({
      driver: 'raw',
      'node-name': 'd0',
      discard: 'unmap',
      file: { driver: 'file', filename: path, discard: 'unmap' },
    });
    const disk = await t.graph.createBackend('d0', { write: true });
    const data = { length: 4 << 20, hole: false, zero: false, depth: 1 };
    expect(await disk.blockStatus(0, 4 << 20)).toEqual([data]);
    expect(await disk.blockStatus(1 << 20, 64 << 10)).toEqual([{ ...data, length: 64 << 10 }]);
    await disk.trim(1 << 20, 1 << 20);
    await disk.writeZeroes(3 << 20, 64 << 10);
    expect(await disk.blockStatus(0, 4 << 20)).toEqual([
      { ...data, length: 1 << 20 },
      { length: 1 << 20, hole: true, zero: true, depth: 1 },
      { ...data, length: 1 << 20 },
      { length: 64 << 10, hole: true, zero: true, depth: 1 },
      { ...data, length: (1 << 20) - (64 << 10) },
    ]);
    await disk.close();
  });

  it('qcow2: zero and unallocated clusters are reported without wantZero too', async () => {
    const path = join(t.dir, 'img.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '4M']);
    execFileSync('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 1 0 64k',
      '-c',
      'write -z 1M 64k',
      path,
    ]);
    await t.graph.add({
      driver: 'qcow2',
      'node-name': 'd0',
      file: { driver: 'file', filename: path },
    });
    const disk = await t.graph.createBackend('d0');
    const cheap = await disk.blockStatus(0, 4 << 20, { wantZero: false });
    expect(cheap[0]).toEqual({ length: 64 << 10, hole: false, zero: false, depth: 1 });
    expect(cheap.slice(1).every((e) => e.zero)).toBe(true);
    await disk.close();
  });
});
