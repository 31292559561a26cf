// EngineFile.copyTo: copy_file_range between two files, on the thread pool.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type Engine, EngineError, ErrorCode, IoError, openEngine } from '../src/index.ts';
import { fill, rng, tempDir } from './helpers.ts';

const MiB = 1024 * 1024;
/** tmpfs where there is one (buffered I/O that always goes through the page cache). */
const SHM = existsSync('/dev/shm') ? '/dev/shm' : undefined;

let engine: Engine;
let tmp: ReturnType<typeof tempDir>;
beforeEach(async () => {
  engine = await openEngine({ backend: 'io_uring' });
  tmp = tempDir(SHM);
});
afterEach(async () => {
  await engine.close();
  tmp.cleanup();
});

describe('copyTo', () => {
  it('copies a range to another offset of another file and grows it', async () => {
    const data = new Uint8Array(3 * MiB);
    fill(data, rng(7));
    writeFileSync(tmp.file('src'), data);
    writeFileSync(tmp.file('dst'), new Uint8Array(4096));
    const src = await engine.openFile(tmp.file('src'), { readOnly: true });
    const dst = await engine.openFile(tmp.file('dst'));
    const n = await src.copyTo(dst, MiB + 512, 8192, 2 * MiB - 512);
    expect(n).toBe(2 * MiB - 512);
    await src.close();
    await dst.close();
    const got = readFileSync(tmp.file('dst'));
    expect(got.byteLength).toBe(8192 + 2 * MiB - 512);
    expect(got.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(got.subarray(8192), Buffer.from(data.subarray(MiB + 512)))).toBe(0);
  });

  it('stops at the end of the source: the bytes copied', async () => {
    writeFileSync(tmp.file('src'), new Uint8Array(10_000).fill(0xab));
    const src = await engine.openFile(tmp.file('src'), { readOnly: true });
    const dst = await engine.openFile(tmp.file('dst'), { create: true });
    expect(await src.copyTo(dst, 8000, 0, 5000)).toBe(2000);
    expect(await src.copyTo(dst, 20_000, 0, 5000)).toBe(0);
    await src.close();
    await dst.close();
    expect(readFileSync(tmp.file('dst'))).toEqual(Buffer.alloc(2000, 0xab));
  });

  it('refuses O_DIRECT files (NOT_SUPPORTED) and reports what the kernel refuses', async () => {
    writeFileSync(tmp.file('src'), new Uint8Array(65536).fill(1));
    const src = await engine.openFile(tmp.file('src'));
    const ro = await engine.openFile(tmp.file('src'), { readOnly: true });
    // tmpfs has no O_DIRECT: the direct file lives on the disk's file system.
    const disk = tempDir();
    writeFileSync(disk.file('direct'), new Uint8Array(65536));
    const direct = await engine.openFile(disk.file('direct'), { direct: true });
    try {
      const e1 = await src.copyTo(direct, 0, 0, 4096).catch((e: unknown) => e);
      expect(e1).toBeInstanceOf(EngineError);
      expect((e1 as EngineError).code).toBe(ErrorCode.NOT_SUPPORTED);
      // Into a file opened read-only: the kernel's EBADF.
      const e2 = await src.copyTo(ro, 0, 0, 4096).catch((e: unknown) => e);
      expect(e2).toBeInstanceOf(IoError);
      expect((e2 as IoError).errnoName).toBe('EBADF');
    } finally {
      await src.close();
      await ro.close();
      await direct.close();
      disk.cleanup();
    }
  });
});
