// Replies written to the socket's descriptor (FileSender.sendv): a turn's replies leave in
// one sendmsg, and what the socket does not take goes through the socket's write, in
// order. Checked with qemu-io and qemu-img against a file, with a socket taking every
// byte, a few bytes a turn, or failing every direct send.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type FileSender, FileTarget, NbdClient } from '../src/index.ts';
import {
  EAGAIN,
  fileSender,
  run,
  type Started,
  startServer,
  stillServes,
  tempDir,
} from './server-helpers.ts';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const EPIPE = -32;

describe('NbdServer sending replies with sendmsg', () => {
  const tmp = tempDir();
  let s: Started | undefined;
  let target: FileTarget | undefined;
  afterEach(async () => {
    await s?.server.close();
    await target?.close();
    s = undefined;
    target = undefined;
  });

  /** A writable export of a fresh file of SIZE bytes, served with `sender`. */
  const serve = async (name: string, sender: FileSender) => {
    const path = join(tmp.dir, name);
    writeFileSync(path, Buffer.alloc(SIZE));
    target = await FileTarget.open(path);
    s = await startServer([{ name: 'd', target, writable: true }], { fileSender: sender });
    return { started: s, path };
  };

  /** Writes and reads by qemu-io, many reads in flight by our client, qemu-img compare. */
  const exercise = async (started: Started, path: string) => {
    const io = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x5a 0 1M',
      '-c',
      `write -P 0xa5 ${MiB + 512} 4k`,
      '-c',
      'read -P 0x5a 0 1M',
      '-c',
      `read -P 0xa5 ${MiB + 512} 4k`,
      '-c',
      `read -P 0 ${2 * MiB} 64k`,
      started.uri('d'),
    ]);
    expect(io.stderr).toBe('');
    expect(io.stdout).not.toMatch(/Pattern verification failed|error/i);
    expect(io.code).toBe(0);
    const file = readFileSync(path);
    const c = await NbdClient.connect(started.uri('d'));
    try {
      const reads = Array.from({ length: 64 }, (_, i) => {
        const at = (i * 40_961) % (SIZE - 70_000);
        const n = 1 + ((i * 9_973) % 70_000);
        return c.read(at, n).then((b) => [at, b] as const);
      });
      for (const [at, b] of await Promise.all(reads)) {
        expect(Buffer.from(b).equals(file.subarray(at, at + b.byteLength))).toBe(true);
      }
    } finally {
      await c.close();
    }
    const cmp = await run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      path,
      started.uri('d'),
    ]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  };

  it('sends a turn of replies in one sendmsg', async () => {
    const calls: number[] = [];
    const { started, path } = await serve('whole.raw', {
      ...fileSender,
      sendv: (sock, bufs) => {
        calls.push(bufs.length);
        return fileSender.sendv!(sock, bufs);
      },
    });
    await exercise(started, path);
    expect(calls.length).toBeGreaterThan(0);
    // Some turn carried more than one reply (64 reads in flight, structured replies).
    expect(Math.max(...calls)).toBeGreaterThan(2);
  });

  it('queues what the socket did not take, in order, behind it', async () => {
    // The socket takes 7 bytes of the first sendmsg of a turn, then is full.
    let full = false;
    const { started, path } = await serve('part.raw', {
      ...fileSender,
      sendv: (sock, bufs) => {
        if (full) return EAGAIN;
        full = true;
        setImmediate(() => {
          full = false;
        });
        let room = 7;
        const some: Uint8Array[] = [];
        for (const b of bufs) {
          if (room === 0) break;
          some.push(b.subarray(0, Math.min(room, b.byteLength)));
          room -= some.at(-1)!.byteLength;
        }
        return fileSender.sendv!(sock, some);
      },
    });
    await exercise(started, path);
  });

  it('leaves to the socket a direct send that fails, and goes on serving', async () => {
    const { started, path } = await serve('fail.raw', { ...fileSender, sendv: () => EPIPE });
    await exercise(started, path);
    expect((await stillServes(started.port, 'd')).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
  });
});
