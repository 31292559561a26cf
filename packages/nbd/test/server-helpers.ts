// Shared pieces of the server's tests: a server on 127.0.0.1 with an ephemeral port, the
// peers run as child processes, and the check that a server still serves.

import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import koffi from 'koffi';
import {
  type ExportOptions,
  type FileSender,
  NbdServer,
  type NbdServerOptions,
} from '../src/index.ts';
import { Command, OptionReply } from '../src/protocol.ts';
import { RawNbd, replyError } from './raw-nbd.ts';

export interface Started {
  server: NbdServer;
  port: number;
  uri(name: string): string;
}

const libc = koffi.load('libc.so.6');

/** dup(2), as vm-disk gives the server (sockets read through read-router.ts). */
export const dupFd: (fd: number) => number = libc.func('int dup(int fd)');

const sendFn = libc.func('long send(int fd, void *buf, size_t len, int flags)');
const sendfileFn = libc.func(
  'long sendfile(int out_fd, int in_fd, _Inout_ int64_t *off, size_t n)',
);
const preadFn = libc.func('long pread(int fd, void *buf, size_t count, int64_t offset)');
const recvFn = libc.func('long recv(int fd, void *buf, size_t len, int flags)');
/** -EAGAIN, as a FileSender call returns it when the socket is full. */
export const EAGAIN = -11;
const orErrno = (r: number | bigint): number => (Number(r) < 0 ? -koffi.errno() : Number(r));

const send = (sock: number, buf: Uint8Array): number =>
  orErrno(sendFn(sock, buf, buf.byteLength, 0x40 | 0x4000));

/**
 * send(2) of each buffer in turn (what sendmsg does, in several calls), stopping where
 * the socket takes less than a whole buffer.
 */
function sendv(sock: number, bufs: readonly Uint8Array[]): number {
  let done = 0;
  for (const b of bufs) {
    const n = b.byteLength === 0 ? 0 : send(sock, b);
    if (n < 0) return done > 0 ? done : n;
    done += n;
    if (n < b.byteLength) break;
  }
  return done;
}

/**
 * send(2), sendmsg, sendfile(2) and pread(2) for the server, as vm-disk gives it
 * @vmdisk/engine's.
 */
export const fileSender: FileSender = {
  send,
  sendv,
  sendFile: (sock, fd, offset, length) => orErrno(sendfileFn(sock, fd, [offset], length)),
  read: (fd, buf, offset) => orErrno(preadFn(fd, buf, buf.byteLength, offset)),
};

/** recv(2) without waiting, as vm-disk gives the server @vmdisk/engine's recvNow. */
export const recv = (sock: number, buf: Uint8Array): number =>
  orErrno(recvFn(sock, buf, buf.byteLength, 0x40));

/**
 * A server on 127.0.0.1 with `exports`; it reads its sockets into its own buffers (dupFd,
 * and recv for the rest of a payload) unless `options.dupFd` is given as undefined (as
 * Node gives them).
 */
export async function startServer(
  exports: ExportOptions[],
  options: NbdServerOptions = {},
): Promise<Started> {
  const server = new NbdServer('dupFd' in options ? options : { recv, ...options, dupFd });
  for (const e of exports) server.addExport(e);
  const addr = await server.listen({ host: '127.0.0.1', port: 0 });
  if (!('port' in addr)) throw new Error('expected a TCP address');
  return { server, port: addr.port, uri: (name) => `nbd://127.0.0.1:${addr.port}/${name}` };
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a peer; never rejects (the test looks at the code and output). */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

export function tempDir(): { dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vmdisk-nbd-test-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * A fresh client negotiates `name` with structured replies and reads its first 4 KiB:
 * the server still serves. Returns the bytes read.
 */
export async function stillServes(port: number, name: string): Promise<Buffer> {
  const { nbd } = await RawNbd.open(port, name, { structured: true });
  try {
    nbd.request({ type: Command.READ, cookie: 77n, offset: 0n, length: 4096, flags: 4 /* DF */ });
    const msgs = await nbd.reply();
    if (replyError(msgs) !== 0) throw new Error(`read failed: ${replyError(msgs)}`);
    const data = msgs.find((m) => m.type === 1);
    if (data?.cookie !== 77n) throw new Error('no data chunk for the read');
    return data.payload.subarray(8);
  } finally {
    nbd.destroy();
  }
}

export { OptionReply };

/** Waits until `cond()` holds (polled every 10 ms), or fails after `timeoutMs`. */
export async function until(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
