// A copy-on-write read that fails aborts the allocation: the write fails with the errno
// from below, and a later write to the same cluster goes through (nothing stays locked).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';

describe('copy on write from a failing backing node', () => {
  it('fails the write with the errno, then lets the cluster be written', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmdisk-cow-fail-'));
    const graph = new BlockGraph();
    try {
      const base = join(dir, 'base.raw');
      const top = join(dir, 'top.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'raw', base, '4M']);
      execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4M', base]);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
      await graph.add({
        driver: 'qcow2',
        'node-name': 'top',
        file: { driver: 'file', filename: top },
        backing: {
          driver: 'blkdebug',
          'node-name': 'dbg',
          'inject-error': [
            { iotype: 'read', errno: 'EIO', offset: 1 << 20, length: 65536, once: true },
          ],
          image: { driver: 'raw', file: { driver: 'file', filename: base } },
        },
      });
      const disk = await graph.createBackend('top', { write: true });
      // 512 bytes into an unallocated 64 KiB cluster: the rest is copied from the backing.
      await expect(disk.write((1 << 20) + 4096, Buffer.alloc(512, 0x22))).rejects.toMatchObject({
        errnoName: 'EIO',
      });
      await disk.write((1 << 20) + 4096, Buffer.alloc(512, 0x22));
      const buf = Buffer.alloc(65536);
      await disk.read(1 << 20, buf);
      expect(buf.subarray(0, 4096).every((b) => b === 0x11)).toBe(true);
      expect(buf.subarray(4096, 4608).every((b) => b === 0x22)).toBe(true);
      expect(buf.subarray(4608).every((b) => b === 0x11)).toBe(true);
      await disk.close();
      await graph.close();
      execFileSync('qemu-img', ['check', '-q', top]);
    } finally {
      await graph.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
