// Byte-range locks (open file description locks), against each other and against QEMU's
// own: qemu-io holding an image takes its permission bytes (100 + bit) and "not shared"
// bytes (200 + bit), which an EngineFile must see.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Engine, EngineError, openEngine } from '../src/index.ts';
import { tempDir } from './helpers.ts';

let engine: Engine;
const dir = tempDir();

beforeAll(async () => {
  engine = await openEngine({ backend: 'threadpool' });
});
afterAll(async () => {
  await engine.close();
  dir.cleanup();
});

describe('open file description locks', () => {
  it('conflict between two opens of one file in one process, and go with close', async () => {
    const path = dir.file('two-opens.img');
    writeFileSync(path, Buffer.alloc(4096));
    const a = await engine.openFile(path);
    const b = await engine.openFile(path);
    try {
      a.setLock('shared', 100, 1);
      expect(b.lockConflicts('shared', 100, 1)).toBe(false);
      expect(b.lockConflicts('exclusive', 100, 1)).toBe(true);
      expect(a.lockConflicts('exclusive', 100, 1)).toBe(false); // its own lock
      b.setLock('shared', 100, 1); // shared locks coexist
      expect(() => b.setLock('exclusive', 100, 1)).toThrow(
        expect.objectContaining({ errnoName: 'EAGAIN', syscall: 'fcntl' }),
      );
      a.setLock('unlock', 100, 1);
      b.setLock('exclusive', 100, 1); // a let go
      expect(a.lockConflicts('shared', 100, 1)).toBe(true);
    } finally {
      await b.close();
    }
    expect(a.lockConflicts('exclusive', 100, 1)).toBe(false); // b's locks went with it
    await a.close();
  });

  it('sees the bytes qemu-io locks while it holds an image writable', async () => {
    const path = dir.file('held.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']);
    const holder: ChildProcess = spawn('qemu-io', ['-f', 'qcow2', path], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    try {
      // qemu-io prints its prompt once the image is open (and locked).
      await new Promise<void>((resolve, reject) => {
        holder.stdout!.on('data', (d: Buffer) => {
          if (d.toString().includes('qemu-io>')) resolve();
        });
        holder.on('exit', (code) => reject(new Error(`qemu-io exited ${code}`)));
      });
      const f = await engine.openFile(path, { readOnly: true });
      try {
        // consistent-read (bit 0), write (bit 1) and resize (bit 3) held; write and resize
        // not shared.
        expect(f.lockConflicts('exclusive', 100, 1)).toBe(true);
        expect(f.lockConflicts('exclusive', 101, 1)).toBe(true);
        expect(f.lockConflicts('exclusive', 201, 1)).toBe(true);
        expect(f.lockConflicts('exclusive', 203, 1)).toBe(true);
        expect(f.lockConflicts('exclusive', 200, 1)).toBe(false);
        expect(f.lockConflicts('shared', 101, 1)).toBe(false); // read locks only
      } finally {
        await f.close();
      }
    } finally {
      holder.stdin!.end('quit\n');
      await new Promise((r) => holder.once('close', r));
    }
  });

  it('refuses bad ranges and closed files with stable codes', async () => {
    const path = dir.file('bad.img');
    writeFileSync(path, Buffer.alloc(512));
    const f = await engine.openFile(path);
    expect(() => f.setLock('shared', -1, 1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_ENGINE_INVALID_ARGUMENT' }),
    );
    expect(() => f.lockConflicts('exclusive', 0, 0)).toThrow(EngineError);
    await f.close();
    expect(() => f.setLock('shared', 100, 1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_ENGINE_FILE_CLOSED' }),
    );
    f.setLock('unlock', 100, 1); // nothing to drop on a closed file
  });
});
