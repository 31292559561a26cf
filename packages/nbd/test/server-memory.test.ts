// The server's resident memory (VmRSS of a child process running only the server) under
// 48 clients that each send several 32 MiB READs and never read their socket: it stays
// within the request memory budget and a margin, another client is served meanwhile, and
// it comes back once they have gone (buffers beyond the pool's cache are freed at once).
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../src/index.ts';
import { Command } from '../src/protocol.ts';
import { RawNbd } from './raw-nbd.ts';
import { tempDir } from './server-helpers.ts';

const MiB = 1024 * 1024;
const tmp = tempDir();
let child: ChildProcess | undefined;

afterEach(() => {
  child?.kill('SIGKILL');
  child = undefined;
  tmp.cleanup();
});

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) / 1024;
}

interface Stats {
  budget: number;
  inUse: number;
  connections: number;
}

/** The server in a child process: its pid, port, and its counters on request. */
async function startChild(
  image: string,
): Promise<{ pid: number; port: number; stats(): Promise<Stats> }> {
  const c = spawn(process.execPath, [join(import.meta.dirname, 'memory-child.ts'), image], {
    stdio: ['pipe', 'pipe', 'inherit'],
    // glibc's default mmap threshold, fixed: freed buffers are unmapped, not kept in the
    // heap (vm-disk does the same with mallopt; see the README).
    env: { ...process.env, MALLOC_MMAP_THRESHOLD_: '131072' },
  });
  child = c;
  const lines: Interface = createInterface({ input: c.stdout! });
  const next = (): Promise<string> =>
    new Promise((resolve, reject) => {
      lines.once('line', resolve);
      c.once('exit', (code) => reject(new Error(`the server exited (${code})`)));
    });
  const port = Number(await next());
  return {
    pid: c.pid!,
    port,
    stats: async () => {
      const reply = next();
      c.stdin!.write('stats\n');
      return JSON.parse(await reply) as Stats;
    },
  };
}

/** Polls the server's counters until `cond` holds. */
async function until(
  server: { stats(): Promise<Stats> },
  what: string,
  cond: (s: Stats) => boolean,
): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!cond(await server.stats())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('NbdServer memory under clients that never read', () => {
  it('48 connections x 4 unread 32 MiB reads: bounded, others served, memory back after', async () => {
    const image = join(tmp.dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(64 * MiB, 0xa5));
    const server = await startChild(image);
    const { pid, port } = server;
    const before = rssMiB(pid);
    const stuck: RawNbd[] = [];
    for (let i = 0; i < 48; i++) {
      const { nbd } = await RawNbd.open(port, 'disk');
      nbd.socket.pause();
      for (let k = 0; k < 4; k++) {
        nbd.request({ type: Command.READ, cookie: BigInt(k), offset: 0n, length: 32 * MiB });
      }
      stuck.push(nbd);
    }
    // Each client holds two 1 MiB pieces of its first reply (the rest of the reply went to
    // the kernel, its other reads wait): 96 MiB of the default 256 MiB budget.
    await until(server, 'the clients to be stuck', (s) => s.inUse === 48 * 2 * MiB);
    let during = rssMiB(pid);
    const other = await NbdClient.connect(`nbd://127.0.0.1:${port}/disk`);
    expect((await other.read(0, 65536)).every((b) => b === 0xa5)).toBe(true);
    await other.close();
    during = Math.max(during, rssMiB(pid));
    console.log(`server RSS: before ${before.toFixed(0)} MiB, during ${during.toFixed(0)} MiB`);
    // 6 GiB asked for: within the 256 MiB budget.
    expect(during).toBeLessThan(before + 256);
    for (const nbd of stuck) nbd.destroy();
    await until(server, 'the clients to be gone', (s) => s.connections === 0 && s.inUse === 0);
    const after = rssMiB(pid);
    console.log(`server RSS after the clients left: ${after.toFixed(0)} MiB`);
    expect(after).toBeLessThan(before + 32);
  }, 120_000);
});
