// Independent NBD peers for the client tests: qemu-nbd and nbdkit started as child
// processes on unix sockets in a temp dir or on 127.0.0.1 with a free port, ready once
// their pid file exists; stopped (and reaped) by stop().

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach } from 'vitest';
import { fillPattern } from '../../../tools/test-support/src/index.ts';
import { NbdClient } from '../src/index.ts';

export const run = promisify(execFile);

let peerCount = 0;
const uniqueName = (base: string): string => `${base}-${++peerCount}`;

export interface Peer {
  child: ChildProcess;
  /** For unix-socket peers. */
  socket?: string;
  /** For TCP peers. */
  port?: number;
  stderr: () => string;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

export async function makeTempDir(prefix = 'vmdisk-nbd-client-'): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/** A TCP port free right now on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address() as net.AddressInfo;
      srv.close(() => resolve(addr.port));
    });
  });
}

async function waitFor(path: string, child: ChildProcess, err: () => string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (existsSync(path)) return;
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`the peer exited before it was ready: ${err()}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`the peer did not get ready: ${err()}`);
}

function start(cmd: string, args: string[], ready: string): Promise<Peer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  const peer: Peer = {
    child,
    stderr: () => stderr,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
  return waitFor(ready, child, () => stderr).then(
    () => peer,
    async (e) => {
      await peer.stop('SIGKILL');
      throw e;
    },
  );
}

/** nbdkit in the foreground on a unix socket (or on a TCP port with tcp: true). */
export async function nbdkit(
  dir: string,
  args: string[],
  opts: { tcp?: boolean; name?: string } = {},
): Promise<Peer> {
  const name = uniqueName(opts.name ?? 'nbdkit');
  const pid = join(dir, `${name}.pid`);
  if (opts.tcp) {
    const port = await freePort();
    const p = await start(
      'nbdkit',
      ['-f', '-i', '127.0.0.1', '-p', String(port), '-P', pid, ...args],
      pid,
    );
    p.port = port;
    return p;
  }
  const socket = join(dir, `${name}.sock`);
  const p = await start('nbdkit', ['-f', '-U', socket, '-P', pid, ...args], pid);
  p.socket = socket;
  return p;
}

/** qemu-nbd (persistent, shared) on a unix socket or on a TCP port. */
export async function qemuNbd(
  dir: string,
  args: string[],
  opts: { tcp?: boolean; name?: string } = {},
): Promise<Peer> {
  const name = uniqueName(opts.name ?? 'qemu-nbd');
  const pid = join(dir, `${name}.pid`);
  const common = ['-t', '-e', '8', '--pid-file', pid];
  if (opts.tcp) {
    const port = await freePort();
    const p = await start(
      'qemu-nbd',
      [...common, '-b', '127.0.0.1', '-p', String(port), ...args],
      pid,
    );
    p.port = port;
    return p;
  }
  const socket = join(dir, `${name}.sock`);
  const p = await start('qemu-nbd', [...common, '-k', socket, ...args], pid);
  p.socket = socket;
  return p;
}

/** A pattern that differs per byte and per seed. */
export function pattern(length: number, seed: number): Buffer {
  return fillPattern(Buffer.allocUnsafe(length), seed);
}

/**
 * For a describe block: a temp dir per test, and the peers and clients started in a test
 * always stopped after it (registers beforeEach/afterEach).
 */
export function usePeers() {
  let dir = '';
  let peers: Peer[] = [];
  let clients: NbdClient[] = [];
  beforeEach(async () => {
    dir = await makeTempDir();
    peers = [];
    clients = [];
  });
  afterEach(async () => {
    for (const c of clients) c.destroy();
    for (const p of peers) await p.stop('SIGKILL');
    await removeDir(dir);
  });
  const track = (p: Peer): Peer => {
    peers.push(p);
    return p;
  };
  const trackClient = (c: NbdClient): NbdClient => {
    clients.push(c);
    return c;
  };
  return {
    get dir(): string {
      return dir;
    },
    track,
    trackClient,
    nbdkit: async (args: string[], opts: { tcp?: boolean; name?: string } = {}) =>
      track(await nbdkit(dir, args, opts)),
    qemuNbd: async (args: string[], opts: { tcp?: boolean; name?: string } = {}) =>
      track(await qemuNbd(dir, args, opts)),
    connect: async (...args: Parameters<typeof NbdClient.connect>) =>
      trackClient(await NbdClient.connect(...args)),
  };
}
