// The shared libc calls, on real fds: results and -errno as the kernel gives them.

import { mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  closeFd,
  ERRNO,
  errnoName,
  eventfd,
  eventfdRead,
  eventfdSignal,
  mmapShared,
  munmap,
  pollReadable,
  read,
  setSendBufferSize,
  view,
  write,
} from '../src/index.ts';

const dir = mkdtempSync(join(tmpdir(), 'vmdisk-native-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('@vmdisk/native', () => {
  it('eventfd: signals add up, a read takes the count and clears it', () => {
    const fd = eventfd();
    expect(fd).toBeGreaterThanOrEqual(0);
    expect(eventfdRead(fd)).toBe(-ERRNO.EAGAIN);
    expect(eventfdSignal(fd)).toBe(8);
    expect(eventfdSignal(fd, 41)).toBe(8);
    expect(eventfdRead(fd)).toBe(42);
    expect(eventfdRead(fd)).toBe(-ERRNO.EAGAIN);
    expect(closeFd(fd)).toBe(0);
  });

  it('a poll handle calls back on the event loop when the fd becomes readable', async () => {
    const fd = eventfd();
    const woken = new Promise<number>((resolve) => {
      const h = pollReadable(fd, () => {
        h.close();
        resolve(eventfdRead(fd));
      });
    });
    eventfdSignal(fd, 3);
    expect(await woken).toBe(3);
    closeFd(fd);
  });

  it('read, write and a shared mapping see the same file', () => {
    const path = join(dir, 'f');
    writeFileSync(path, Buffer.alloc(8192));
    const fd = openSync(path, 'r+');
    expect(write(fd, Buffer.from('hello'))).toBe(5);
    const addr = mmapShared(fd, 8192, 0);
    expect(typeof addr).toBe('bigint');
    const mapped = new Uint8Array(view(addr as bigint, 8192));
    expect(Buffer.from(mapped.subarray(0, 5)).toString()).toBe('hello');
    mapped.set(Buffer.from('page2'), 4096);
    expect(munmap(addr as bigint, 8192)).toBe(0);
    expect(readFileSync(path).subarray(4096, 4101).toString()).toBe('page2');
    const back = new Uint8Array(16);
    expect(read(fd, back)).toBe(16); // the file offset is past "hello"
    expect(closeFd(fd)).toBe(0);
  });

  it('failures are -errno, with names', () => {
    expect(closeFd(-1)).toBe(-ERRNO.EBADF);
    expect(read(-1, new Uint8Array(1))).toBe(-ERRNO.EBADF);
    expect(mmapShared(-1, 4096, 0)).toBe(-ERRNO.EBADF);
    expect(errnoName(ERRNO.EBADF)).toBe('EBADF');
    expect(errnoName(95)).toBe('ENOTSUP');
    expect(errnoName(4242)).toBe('errno 4242');
  });

  it("setSendBufferSize: a unix socket's send buffer as asked (as root), -errno on a bad fd", async () => {
    const path = join(dir, 'sndbuf.sock');
    const accepted = new Promise<Socket>((resolve) => {
      const server = createServer((s) => {
        server.close();
        resolve(s);
      }).listen(path);
    });
    const client = connect(path);
    const socket = await accepted;
    const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
    const bytes = 4 << 20;
    const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    // Root may force it (SO_SNDBUFFORCE); others get at most twice net.core.wmem_max.
    const expected = process.getuid?.() === 0 ? bytes : Math.min(bytes, 2 * wmemMax);
    expect(setSendBufferSize(fd, bytes)).toBe(expected);
    expect(setSendBufferSize(fd, 1 << 20)).toBe(1 << 20);
    socket.destroy();
    client.destroy();
    expect(setSendBufferSize(1 << 20, bytes)).toBe(-ERRNO.EBADF);
  });
});
