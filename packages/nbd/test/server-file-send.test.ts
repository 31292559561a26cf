// READs answered from a file (ExportTarget.fileRange and NbdServerOptions.fileSender): the
// header and the data go to the socket with send and sendfile, and whatever the socket
// does not take at once is read from the file and queued behind them. Checked against
// qemu-img and qemu-io and our client, with the socket taking every byte, only some of
// them, or not even the whole header, and with a file that fails under the read.

import { closeSync, openSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type ExportTarget, type FileSender, NbdClient } from '../src/index.ts';
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
const SIZE = 8 * MiB;

/** A deterministic, non-repeating pattern. */
function pattern(length: number): Buffer {
  const b = Buffer.alloc(length);
  let x = 0x12345678;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

/** A read-only target over a file whose every range is in the file as is. */
function fileTarget(fd: number, calls: { fileRange: number }): ExportTarget {
  return {
    size: () => SIZE,
    read: async (offset, buf) => {
      readSync(fd, buf, 0, buf.byteLength, offset);
    },
    fileRange: (offset) => {
      calls.fileRange++;
      return { fd, offset };
    },
  };
}

describe('NbdServer answering READs from a file (sendfile)', () => {
  const tmp = tempDir();
  const image = join(tmp.dir, 'disk.raw');
  const data = pattern(SIZE);
  writeFileSync(image, data);
  let s: Started | undefined;
  let fds: number[] = [];
  afterEach(async () => {
    await s?.server.close();
    s = undefined;
    for (const fd of fds) closeSync(fd);
    fds = [];
  });

  const serve = async (sender: FileSender, calls = { fileRange: 0 }) => {
    const fd = openSync(image, 'r');
    fds.push(fd);
    s = await startServer([{ name: 'd', target: fileTarget(fd, calls) }], {
      fileSender: sender,
    });
    return s;
  };

  /** qemu-img compare of the file with the export. */
  const compareWithImage = (started: Started) =>
    run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, started.uri('d')]);

  /** Reads of many sizes, in flight together, each compared with the file. */
  const readBack = async (started: Started) => {
    const c = await NbdClient.connect(started.uri('d'));
    try {
      const sizes = [32 * 1024, 40_000, 256 * 1024, 1 * MiB, 65_536 + 7, 512 * 1024];
      const reads = sizes.map((n, i) => {
        const at = (i * 1_234_567) % (SIZE - n);
        return c.read(at, n).then((b) => [at, b] as const);
      });
      for (const [at, b] of await Promise.all(reads)) {
        expect(Buffer.from(b).equals(data.subarray(at, at + b.byteLength))).toBe(true);
      }
    } finally {
      await c.close();
    }
  };

  it('sends the file to qemu-img and qemu-io as it is', async () => {
    let files = 0;
    const calls = { fileRange: 0 };
    const started = await serve(
      {
        ...fileSender,
        sendFile: (...a) => {
          files++;
          return fileSender.sendFile(...a);
        },
      },
      calls,
    );
    const cmp = await compareWithImage(started);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.code).toBe(0);
    const io = await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      `read -v ${3 * MiB + 5} 16`,
      '-c',
      `read ${MiB} ${MiB}`,
      started.uri('d'),
    ]);
    expect(io.code).toBe(0);
    const want = [...data.subarray(3 * MiB + 5, 3 * MiB + 21)]
      .map((b) => b.toString(16).padStart(2, '0'))
      .join(' ');
    expect(io.stdout.replace(/\s+/g, ' ')).toContain(want.slice(0, 23));
    expect(calls.fileRange).toBeGreaterThan(0);
    expect(files).toBeGreaterThan(0);
    await readBack(started);
  });

  it('queues what the socket did not take, read from the file, behind it', async () => {
    // The socket takes 10000 bytes of each sendfile, then is full.
    let full = false;
    const started = await serve({
      ...fileSender,
      sendFile: (sock, fd, offset, length) => {
        if (full) return EAGAIN;
        full = true;
        return fileSender.sendFile(sock, fd, offset, Math.min(length, 10_000));
      },
      send: (sock, buf) => {
        full = false;
        return fileSender.send(sock, buf);
      },
    });
    await readBack(started);
    expect((await compareWithImage(started)).code).toBe(0);
  });

  it('queues the rest of a header the socket took only part of, and all the data', async () => {
    const started = await serve({
      ...fileSender,
      send: (sock, buf) => fileSender.send(sock, buf.subarray(0, 5)),
    });
    await readBack(started);
  });

  it('answers EIO when the file fails before anything went out, and goes on serving', async () => {
    const fd = openSync(image, 'r');
    fds.push(fd);
    let broken = true;
    const target: ExportTarget = {
      ...fileTarget(fd, { fileRange: 0 }),
      // A descriptor that is no file: sendfile and pread of it fail (EBADF).
      fileRange: (offset) => (broken ? { fd: 1_000_000, offset } : { fd, offset }),
    };
    s = await startServer([{ name: 'd', target }], {
      fileSender: { ...fileSender, send: () => EAGAIN },
    });
    const c = await NbdClient.connect(s.uri('d'));
    await expect(c.read(0, 64 * 1024)).rejects.toMatchObject({ errnoName: 'EIO' });
    broken = false;
    expect(Buffer.from(await c.read(0, 64 * 1024)).equals(data.subarray(0, 64 * 1024))).toBe(true);
    await c.close();
  });

  it('drops the client when the file fails after its header went out; others are served', async () => {
    const fd = openSync(image, 'r');
    fds.push(fd);
    const target: ExportTarget = {
      ...fileTarget(fd, { fileRange: 0 }),
      fileRange: (offset, length) => (length === 64 * 1024 ? { fd: 1_000_000, offset } : undefined),
    };
    s = await startServer([{ name: 'd', target }], { fileSender });
    const c = await NbdClient.connect(s.uri('d'));
    await expect(c.read(0, 64 * 1024)).rejects.toBeDefined();
    c.destroy();
    expect((await stillServes(s.port, 'd')).equals(data.subarray(0, 4096))).toBe(true);
  });

  it('is not used for reads under 32 KiB, nor without a fileSender', async () => {
    const calls = { fileRange: 0 };
    const fd = openSync(image, 'r');
    fds.push(fd);
    s = await startServer([{ name: 'd', target: fileTarget(fd, calls) }]);
    const c = await NbdClient.connect(s.uri('d'));
    expect(
      Buffer.from(await c.read(MiB, 256 * 1024)).equals(data.subarray(MiB, MiB + 256 * 1024)),
    ).toBe(true);
    await c.close();
    await s.server.close();
    s = await serve(fileSender, calls);
    const small = await NbdClient.connect(s.uri('d'));
    expect(
      Buffer.from(await small.read(4096, 32 * 1024 - 1)).equals(
        data.subarray(4096, 4096 + 32 * 1024 - 1),
      ),
    ).toBe(true);
    await small.close();
    expect(calls.fileRange).toBe(0);
  });
});
