// A FUSE export of an in-memory target, mounted for real (root and /dev/fuse): what the
// file shows and does through the kernel, how target errors reach the caller as errnos,
// SEEK_DATA/SEEK_HOLE from block status, and the mount's lifecycle and errors. The export
// is served by this very thread: the test touches the file only through asynchronous calls
// (a synchronous one would wait for an answer this thread cannot give).
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FuseError, FuseExport, type FuseTarget } from '../src/index.ts';

const exec = promisify(execFile);
let dir = '';
const exports: FuseExport[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-fuse-pkg-'));
});
afterEach(async () => {
  await Promise.all(exports.splice(0).map((e) => e.close()));
  rmSync(dir, { recursive: true, force: true });
});

function mounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path);
}

/** A target over memory: the first `holeFrom` bytes are data, the rest a hole. */
function memoryTarget(size: number, holeFrom = size): FuseTarget & { data: Uint8Array } {
  const t = {
    data: new Uint8Array(size),
    size: () => t.data.byteLength,
    read: async (offset: number, buf: Uint8Array) => {
      buf.set(t.data.subarray(offset, offset + buf.byteLength));
    },
    write: async (offset: number, buf: Uint8Array) => {
      t.data.set(buf, offset);
    },
    flush: async () => {},
    blockStatus: async (offset: number, length: number) => {
      const end = offset + length;
      if (offset >= holeFrom) return [{ length, hole: true }];
      if (end <= holeFrom) return [{ length, hole: false }];
      return [
        { length: holeFrom - offset, hole: false },
        { length: end - holeFrom, hole: true },
      ];
    },
    truncate: async (n: number) => {
      const d = new Uint8Array(n);
      d.set(t.data.subarray(0, Math.min(n, t.data.byteLength)));
      t.data = d;
    },
  };
  return t;
}

async function mountOn(
  target: FuseTarget,
  extra: Partial<Parameters<typeof FuseExport.mount>[0]> = {},
) {
  const mountpoint = join(dir, 'disk');
  writeFileSync(mountpoint, '');
  const e = await FuseExport.mount({ mountpoint, target, writable: true, ...extra });
  exports.push(e);
  return { e, mountpoint };
}

describe('FuseExport', () => {
  it('shows the target as a regular file: size, reads, writes, a short read at the end', async () => {
    const t = memoryTarget(1024 * 1024 + 100);
    t.data.fill(0x5a, 0, 4096);
    const { e, mountpoint } = await mountOn(t);
    expect(mounted(mountpoint)).toBe(true);
    const st = await stat(mountpoint);
    expect([st.size, st.mode.toString(8), st.blocks, st.ino]).toEqual([
      1024 * 1024 + 100,
      '100600',
      2049,
      1,
    ]);
    const f = await open(mountpoint, 'r+');
    const buf = Buffer.alloc(8192);
    expect((await f.read(buf, 0, 8192, 0)).bytesRead).toBe(8192);
    expect(buf.subarray(0, 4096).every((b) => b === 0x5a)).toBe(true);
    // 1 MiB in one write: one request at the export's largest write size.
    await f.write(Buffer.alloc(1024 * 1024, 7), 0, 1024 * 1024, 50);
    await f.sync();
    expect(t.data.subarray(50, 50 + 1024 * 1024).every((b) => b === 7)).toBe(true);
    expect((await f.read(buf, 0, 8192, 1024 * 1024)).bytesRead).toBe(100);
    await f.close();
    await e.close();
    expect(mounted(mountpoint)).toBe(false);
  });

  it('runs direct I/O requests concurrently (FUSE_ASYNC_DIO)', async () => {
    // Each read waits until four are on the target at once: without asynchronous direct
    // I/O the kernel sends one request of fio's queue at a time and this never completes.
    const t = memoryTarget(1024 * 1024);
    const waiting: (() => void)[] = [];
    let peak = 0;
    t.read = (offset, buf) =>
      new Promise<void>((resolve) => {
        buf.set(t.data.subarray(offset, offset + buf.byteLength));
        waiting.push(resolve);
        peak = Math.max(peak, waiting.length);
        if (waiting.length >= 4) for (const w of waiting.splice(0)) w();
      });
    const { mountpoint } = await mountOn(t, { writable: false });
    await exec('fio', [
      '--name=t',
      `--filename=${mountpoint}`,
      '--rw=randread',
      '--bs=4k',
      '--iodepth=4',
      '--iodepth_batch_submit=4',
      '--ioengine=io_uring',
      '--direct=1',
      '--number_ios=4',
      '--size=1M',
      '--norandommap',
    ]);
    expect(peak).toBe(4);
  });

  it('answers a failed target request with its errno, and keeps serving', async () => {
    const t = memoryTarget(65536);
    const seen: string[] = [];
    t.write = async () => {
      throw Object.assign(new Error('full'), { errnoName: 'ENOSPC' });
    };
    t.flush = async () => {
      throw new Error('no errno');
    };
    const { mountpoint } = await mountOn(t, {
      onError: (err, errno) => seen.push(`${err.code} ${errno}`),
    });
    const f = await open(mountpoint, 'r+');
    await expect(f.write(Buffer.alloc(512), 0, 512, 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(f.sync()).rejects.toMatchObject({ code: 'EIO' });
    expect((await f.read(Buffer.alloc(512), 0, 512, 0)).bytesRead).toBe(512);
    await f.close().catch(() => {});
    expect(seen.slice(0, 2)).toEqual([
      'ERR_VMDISK_FUSE_TARGET_ERROR ENOSPC',
      'ERR_VMDISK_FUSE_TARGET_ERROR EIO',
    ]);
  });

  it('reports holes for SEEK_DATA/SEEK_HOLE (qemu-img map of the mounted file)', async () => {
    const t = memoryTarget(4 * 1024 * 1024, 1024 * 1024);
    const { mountpoint } = await mountOn(t, { writable: false });
    const { stdout } = await exec('qemu-img', ['map', '-f', 'raw', '--output=json', mountpoint]);
    expect(JSON.parse(stdout)).toMatchObject([
      { start: 0, length: 1024 * 1024, data: true },
      { start: 1024 * 1024, length: 3 * 1024 * 1024, data: false, zero: true },
    ]);
  });

  it('refuses a missing, non-regular or already exported mount point, in QEMU words', async () => {
    const target = memoryTarget(4096);
    const missing = join(dir, 'missing');
    await expect(
      FuseExport.mount({ mountpoint: missing, target, writable: false }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_FUSE_BAD_MOUNTPOINT',
      message: `Failed to stat '${missing}': No such file or directory`,
    });
    mkdirSync(join(dir, 'd'));
    await expect(
      FuseExport.mount({ mountpoint: join(dir, 'd'), target, writable: false }),
    ).rejects.toThrow(`'${join(dir, 'd')}' is not a regular file`);
    const { mountpoint } = await mountOn(target);
    const again = FuseExport.mount({ mountpoint, target, writable: false });
    await expect(again).rejects.toBeInstanceOf(FuseError);
    await expect(again).rejects.toMatchObject({ code: 'ERR_VMDISK_FUSE_EXPORT_EXISTS' });
    expect((await stat(mountpoint)).size).toBe(4096);
  });
});
