// Image locking as QEMU's (block/file-posix.c): the file driver locks bytes 100 + bit for the
// permissions its parents hold and 200 + bit for those they do not share, so that vm-disk and
// QEMU's tools refuse each other's conflicting uses. Judged by qemu-io and qemu-img holding
// and opening the same images, and by the lock bytes the kernel lists in /proc/locks.

import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { lockedBytes, QemuIoSession } from '../../../tools/test-support/src/index.ts';
import { ImageLockError } from '../src/index.ts';
import { qcow2Fixture } from './helpers.ts';

const { tmp, graph, qcow2 } = qcow2Fixture();

function raw(name: string): string {
  const path = tmp.file(name, Buffer.alloc(1 << 20));
  return path;
}

/** qemu-io on `path` with a command; its status and what it printed. */
function qemuIo(args: string[]): { status: number | null; out: string } {
  const r = spawnSync('qemu-io', args, { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function lockError(err: unknown): ImageLockError {
  expect(err).toBeInstanceOf(ImageLockError);
  return err as ImageLockError;
}

describe('image locking', () => {
  it('a writable qcow2 node locks the bytes qemu-io locks for the same use', async () => {
    const path = qcow2('same-bytes.qcow2');
    const held = await QemuIoSession.open(['-f', 'qcow2', path]);
    const qemuBytes = lockedBytes(path);
    await held.quit();
    expect(qemuBytes).toEqual([100, 101, 103, 201, 203]);

    const g = graph();
    await g.add({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: path } });
    expect(lockedBytes(path)).toEqual(qemuBytes);
    await g.close();
    expect(lockedBytes(path)).toEqual([]);
  });

  it('refuses a second writer in the same process, with QEMU’s message and a stable code', async () => {
    const path = qcow2('twice.qcow2');
    const first = graph();
    await first.add({
      driver: 'qcow2',
      'node-name': 'd',
      file: { driver: 'file', filename: path },
    });
    const second = graph();
    const err = lockError(
      await second
        .add({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: path } })
        .catch((e: unknown) => e),
    );
    expect(err.code).toBe('ERR_VMDISK_BLOCK_IMAGE_LOCKED');
    expect(err.message).toBe('Failed to get "write" lock');
    expect(err.hint).toBe(`Is another process using the image [${path}]?`);
    // A reader that does not share write is refused too; nothing of the refused opens stays.
    const reader = lockError(
      await second
        .add({
          driver: 'qcow2',
          'node-name': 'r',
          'read-only': true,
          file: { driver: 'file', filename: path },
        })
        .catch((e: unknown) => e),
    );
    expect(reader.message).toBe('Failed to get shared "write" lock');
    expect(second.query()).toEqual([]);
    expect(lockedBytes(path)).toEqual([100, 101, 103, 201, 203]);
    // force-share reads it anyway, as qemu-img -U does.
    await second.add({
      driver: 'qcow2',
      'node-name': 'u',
      'read-only': true,
      'force-share': true,
      file: { driver: 'file', filename: path },
    });
    await first.close();
    await second.close();
  });

  it('is refused by qemu-io and qemu-img while vm-disk writes, and refuses them while they write', async () => {
    const path = qcow2('vs-qemu.qcow2');
    const g = graph();
    await g.add({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: path } });
    const write = qemuIo(['-f', 'qcow2', '-c', 'write 0 4k', path]);
    expect(write.status).not.toBe(0);
    expect(write.out).toContain('Failed to get "write" lock');
    expect(write.out).toContain(`Is another process using the image [${path}]?`);
    const info = spawnSync('qemu-img', ['info', path], { encoding: 'utf8' });
    expect(info.status).not.toBe(0);
    expect(info.stderr).toContain('Failed to get shared "write" lock');
    expect(spawnSync('qemu-img', ['info', '-U', path]).status).toBe(0);
    await g.close();
    expect(qemuIo(['-f', 'qcow2', '-c', 'write 0 4k', path]).status).toBe(0);

    const held = await QemuIoSession.open(['-f', 'qcow2', path]);
    try {
      const err = lockError(
        await graph()
          .add({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: path } })
          .catch((e: unknown) => e),
      );
      expect(err.message).toBe('Failed to get "write" lock');
    } finally {
      await held.quit();
    }
  });

  it('takes the write lock with a writing backend and gives it back when it goes', async () => {
    const path = raw('export.raw');
    const g = graph();
    await g.add({ driver: 'raw', 'node-name': 'd', file: { driver: 'file', filename: path } });
    expect(lockedBytes(path)).toEqual([]); // nobody uses the node yet
    // A reader that lets nobody write: qemu-io may not write.
    const reader = await g.createBackend('d');
    expect(lockedBytes(path)).toEqual([100, 201, 203]);
    const refused = qemuIo(['-f', 'raw', '-c', 'write 0 4k', path]);
    expect(refused.status).not.toBe(0);
    expect(refused.out).toContain('Failed to get "write" lock');
    await reader.close();
    // An export's backend writes and shares everything, as QEMU's exports (and qemu-io) do:
    // both may write.
    const writer = await g.createBackend('d', {
      write: true,
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
    expect(lockedBytes(path)).toEqual([100, 101]);
    expect(qemuIo(['-f', 'raw', '-c', 'write 0 4k', path]).status).toBe(0);
    await writer.close();
    expect(lockedBytes(path)).toEqual([]);
  });

  it('a refused backend leaves no lock behind (the permission change is aborted)', async () => {
    const path = qcow2('abort.qcow2');
    // qemu-io reading a qcow2 shares no write of its file.
    const held = await QemuIoSession.open(['-f', 'qcow2', '-r', path]);
    try {
      const g = graph();
      await g.add({ driver: 'raw', 'node-name': 'd', file: { driver: 'file', filename: path } });
      const before = lockedBytes(path);
      expect(before).toEqual([100, 201, 203]); // qemu-io's
      const err = lockError(await g.createBackend('d', { write: true }).catch((e: unknown) => e));
      expect(err.message).toBe('Failed to get "write" lock');
      expect(lockedBytes(path)).toEqual(before);
      expect(g.backendList()).toEqual([]);
      // A reader that lets others write is fine, and takes its byte.
      const reader = await g.createBackend('d', { shareWrite: true });
      expect(lockedBytes(path)).toEqual([100, 100, 201, 203]);
      await reader.close();
      expect(lockedBytes(path)).toEqual(before);
    } finally {
      await held.quit();
    }
  });

  it('locking=off takes no lock; force-share needs read-only', async () => {
    const path = qcow2('off.qcow2');
    const g = graph();
    await g.add({
      driver: 'qcow2',
      'node-name': 'd',
      file: { driver: 'file', filename: path, locking: 'off' },
    });
    expect(lockedBytes(path)).toEqual([]);
    await g.del('d');
    await expect(
      g.add({
        driver: 'qcow2',
        'node-name': 'd',
        'force-share': true,
        file: { driver: 'file', filename: path },
      }),
    ).rejects.toThrow(
      "Invalid option 'force-share': force-share=on can only be used with read-only images",
    );
    await expect(
      g.add({ driver: 'file', 'node-name': 'f', filename: path, locking: 'maybe' }),
    ).rejects.toThrow(/locking/);
  });
});
