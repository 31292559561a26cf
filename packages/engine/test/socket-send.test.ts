// Writing to a socket's descriptor directly (socket-send.ts): sendmsg of many buffers,
// send, sendfile, on a real unix socket read by a Node server, and what each says when
// the socket is full.

import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { IOV_MAX, sendFileNow, sendNow, sendvNow, socketSender } from '../src/index.ts';

const EAGAIN = -11;
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-socket-send-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A connected unix socket pair: the client's fd, and what the server side received. */
async function pair(name: string): Promise<{
  fd: number;
  received: () => Buffer;
  pause: () => void;
  resume: () => void;
  until: (n: number) => Promise<Buffer>;
  close: () => Promise<void>;
}> {
  const path = join(dir, name);
  const chunks: Buffer[] = [];
  let peer: net.Socket | undefined;
  let waiter: (() => void) | undefined;
  const server = net.createServer((s) => {
    peer = s;
    s.on('data', (b) => {
      chunks.push(b);
      waiter?.();
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  const client = net.connect(path);
  await new Promise<void>((r) => client.once('connect', r));
  while (peer === undefined) await new Promise((r) => setImmediate(r));
  const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
  const received = () => Buffer.concat(chunks);
  return {
    fd,
    received,
    pause: () => peer!.pause(),
    resume: () => peer!.resume(),
    until: async (n) => {
      while (received().byteLength < n) await new Promise<void>((r) => (waiter = r));
      return received();
    },
    close: async () => {
      client.destroy();
      peer!.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

describe('socket-send', () => {
  it('sendvNow sends the buffers in order, in one call', async () => {
    const p = await pair('v.sock');
    const bufs = [
      Buffer.from('header'),
      Buffer.alloc(0),
      Buffer.alloc(70_000, 7),
      Buffer.from('!'),
    ];
    const n = sendvNow(p.fd, bufs);
    expect(n).toBe(6 + 70_000 + 1);
    expect((await p.until(n)).equals(Buffer.concat(bufs))).toBe(true);
    await p.close();
  });

  it(`sendvNow sends at most ${IOV_MAX} buffers`, async () => {
    const p = await pair('max.sock');
    const bufs = Array.from({ length: IOV_MAX + 10 }, (_, i) => Buffer.from([i & 0xff]));
    expect(sendvNow(p.fd, bufs)).toBe(IOV_MAX);
    expect((await p.until(IOV_MAX)).equals(Buffer.concat(bufs.slice(0, IOV_MAX)))).toBe(true);
    await p.close();
  });

  it('stops where the socket is full, inside a buffer, then says EAGAIN', async () => {
    const p = await pair('full.sock');
    p.pause();
    const big = Buffer.alloc(8 * 1024 * 1024);
    for (let i = 0; i < big.byteLength; i++) big[i] = (i * 31) & 0xff;
    const first = sendvNow(p.fd, [Buffer.from('abc'), big]);
    expect(first).toBeGreaterThan(3);
    expect(first).toBeLessThan(3 + big.byteLength);
    expect(sendvNow(p.fd, [big.subarray(first - 3)])).toBe(EAGAIN);
    expect(sendNow(p.fd, Buffer.from('x'))).toBe(EAGAIN);
    p.resume();
    const got = await p.until(first);
    expect(got.equals(Buffer.concat([Buffer.from('abc'), big]).subarray(0, first))).toBe(true);
    await p.close();
  });

  it('sendFileNow sends a file range; socketSender gathers the calls', async () => {
    const p = await pair('file.sock');
    const file = join(dir, 'data.bin');
    const data = Buffer.alloc(200_000);
    for (let i = 0; i < data.byteLength; i++) data[i] = (i * 7) & 0xff;
    writeFileSync(file, data);
    const fd = openSync(file, 'r');
    try {
      expect(sendFileNow(p.fd, fd, 1000, 50_000)).toBe(50_000);
      expect((await p.until(50_000)).equals(data.subarray(1000, 51_000))).toBe(true);
      const buf = Buffer.alloc(10);
      expect(socketSender.read(fd, buf, 5)).toBe(10);
      expect(buf.equals(data.subarray(5, 15))).toBe(true);
      expect(socketSender.sendFile(-1, fd, 0, 10)).toBe(-9); // EBADF
    } finally {
      closeSync(fd);
      await p.close();
    }
  });
});
