// The package's own targets: MemoryTarget (sparse, block status from what was written,
// zeroed or trimmed) and FileTarget (node:fs callbacks over a real file, or a file opened
// elsewhere: fromFile).

import { readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../src/buffer-pool.ts';
import { FileTarget, MemoryTarget } from '../src/index.ts';
import { tempDir } from './server-helpers.ts';

const KiB = 1024;

describe('MemoryTarget', () => {
  it('is sparse: only written chunks are allocated, and reads of the rest are zeros', async () => {
    const t = new MemoryTarget(10 * 1024 * KiB);
    expect(t.allocatedBytes).toBe(0);
    await t.write(100 * KiB, Buffer.alloc(8 * KiB, 0xaa), {});
    expect(t.allocatedBytes).toBe(64 * KiB);
    const b = Buffer.alloc(200 * KiB, 0xff);
    await t.read(0, b);
    expect(b.subarray(0, 100 * KiB).every((x) => x === 0)).toBe(true);
    expect(b.subarray(100 * KiB, 108 * KiB).every((x) => x === 0xaa)).toBe(true);
    expect(b.subarray(108 * KiB).every((x) => x === 0)).toBe(true);
  });

  it('reports block status from what was written, zeroed and trimmed', async () => {
    const t = new MemoryTarget(512 * KiB);
    await t.write(64 * KiB, Buffer.alloc(64 * KiB, 1), {});
    await t.write(192 * KiB, Buffer.alloc(128 * KiB, 2), {});
    await t.writeZeroes(192 * KiB, 64 * KiB, { noHole: true }); // stays allocated, reads zero
    await t.trim(256 * KiB, 64 * KiB, {}); // a whole chunk: deallocated
    await t.writeZeroes(64 * KiB, 4 * KiB, {}); // part of a chunk: zeroed in place
    expect(await t.blockStatus(0, 512 * KiB)).toEqual([
      { length: 64 * KiB, hole: true, zero: true },
      // Allocated with data (a zeroed part does not make its 64 KiB chunk read as zero).
      { length: 64 * KiB, hole: false, zero: false },
      { length: 64 * KiB, hole: true, zero: true },
      { length: 64 * KiB, hole: false, zero: true },
      { length: 256 * KiB, hole: true, zero: true },
    ]);
    const b = Buffer.alloc(8 * KiB);
    await t.read(64 * KiB, b);
    expect(b.subarray(0, 4 * KiB).every((x) => x === 0)).toBe(true);
    expect(b.subarray(4 * KiB).every((x) => x === 1)).toBe(true);
  });

  it('refuses a bad size with a stable code', () => {
    expect(() => new MemoryTarget(-1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
  });
});

describe('FileTarget', () => {
  it('reads, writes and flushes a file; read-only has no write', async () => {
    const tmp = tempDir();
    try {
      const path = join(tmp.dir, 'disk.img');
      writeFileSync(path, Buffer.alloc(256 * KiB, 3));
      const t = await FileTarget.open(path);
      expect(t.size()).toBe(256 * KiB);
      await t.write!(4 * KiB, Buffer.alloc(8 * KiB, 9), {});
      await t.flush();
      const b = Buffer.alloc(16 * KiB);
      await t.read(0, b);
      expect(b.subarray(0, 4 * KiB).every((x) => x === 3)).toBe(true);
      expect(b.subarray(4 * KiB, 12 * KiB).every((x) => x === 9)).toBe(true);
      expect(
        readFileSync(path)
          .subarray(4 * KiB, 12 * KiB)
          .every((x) => x === 9),
      ).toBe(true);
      await t.close();
      const ro = await FileTarget.open(path, { readOnly: true });
      expect(ro.write).toBeUndefined();
      await ro.read(4 * KiB, b.subarray(0, 4 * KiB));
      expect(b.subarray(0, 4 * KiB).every((x) => x === 9)).toBe(true);
      await ro.close();
    } finally {
      tmp.cleanup();
    }
  });

  it('fromFile: a file opened elsewhere, read past its end as zeros, closed once', async () => {
    const tmp = tempDir();
    try {
      const path = join(tmp.dir, 'other.img');
      writeFileSync(path, Buffer.alloc(64 * KiB, 5));
      const handle = await open(path, 'r+');
      let closes = 0;
      // A TargetFile over node:fs/promises (an EngineFile in vm-disk's own test).
      const t = await FileTarget.fromFile({
        path,
        readOnly: false,
        size: async () => (await handle.stat()).size,
        read: async (buf, offset) => (await handle.read(buf, 0, buf.byteLength, offset)).bytesRead,
        write: async (buf, offset) => {
          await handle.write(buf, 0, buf.byteLength, offset);
        },
        fdatasync: () => handle.datasync(),
        close: () => {
          closes++;
          return handle.close();
        },
      });
      expect(t.size()).toBe(64 * KiB);
      await t.write!(60 * KiB, Buffer.alloc(4 * KiB, 7), {});
      await t.flush();
      await handle.truncate(62 * KiB); // shrunk under the target
      const b = Buffer.alloc(8 * KiB, 0xff);
      await t.read(56 * KiB, b);
      expect(b.subarray(0, 4 * KiB).every((x) => x === 5)).toBe(true);
      expect(b.subarray(4 * KiB, 6 * KiB).every((x) => x === 7)).toBe(true);
      expect(b.subarray(6 * KiB).every((x) => x === 0)).toBe(true);
      await Promise.all([t.close(), t.close()]);
      expect(closes).toBe(1);
    } finally {
      tmp.cleanup();
    }
  });

  it('keeps the system errno name of a failure', async () => {
    await expect(FileTarget.open('/nonexistent/disk.img')).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_FILE_ERROR',
      errnoName: 'ENOENT',
      syscall: 'open',
    });
    await expect(FileTarget.open('/proc')).rejects.toMatchObject({ errnoName: 'EISDIR' });
  });
});

describe('BufferPool', () => {
  it('hands out buffers of the size asked and reuses what comes back', () => {
    const pool = new BufferPool(64 * KiB);
    const a = pool.get(5000);
    expect(a.length).toBe(5000);
    expect(a.buffer.byteLength).toBe(8192 + 64);
    // A power-of-two payload and a reply header fit the same class.
    expect(pool.get(4096 + 40).buffer.byteLength).toBe(4096 + 64);
    pool.put(a);
    const b = pool.get(6000);
    expect(b.buffer).toBe(a.buffer);
    // Views into someone else's memory, and anything past the cap, are not kept.
    pool.put(Buffer.alloc(8192 + 64).subarray(16));
    expect(pool.get(8192).buffer).not.toBe(a.buffer);
    const big = pool.get(2 * 1024 * KiB);
    pool.put(big);
    expect(pool.get(2 * 1024 * KiB).buffer).not.toBe(big.buffer);
  });
});
