// The memory of `vm-disk serve` under clients that never read their replies: 48
// connections each send several 32 MiB NBD_CMD_READs and leave their socket unread. The
// daemon's resident memory (VmRSS of the child) stays within its request memory budget
// and a margin, another client is served meanwhile, and the memory goes back once they
// have gone.
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import {
  monitorArgs,
  type RunningProcess,
  run,
  startServe,
  useScratch,
  waitFor,
} from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const MiB = 1024 * 1024;
const scratch = useScratch('vmdisk-memory-');
const { running } = scratch;

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) / 1024;
}

/** Connects and negotiates export `name` (NBD_OPT_EXPORT_NAME, simple replies). */
function connect(path: string, name: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(path);
    let got = Buffer.alloc(0);
    let asked = false;
    s.on('error', reject);
    const onData = (d: Buffer): void => {
      got = Buffer.concat([got, d]);
      if (!asked && got.length >= 18) {
        asked = true;
        got = got.subarray(18);
        const opt = Buffer.alloc(20);
        opt.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
        opt.writeBigUInt64BE(0x49484156454f5054n, 4); // IHAVEOPT
        opt.writeUInt32BE(1, 12); // NBD_OPT_EXPORT_NAME
        opt.writeUInt32BE(Buffer.byteLength(name), 16);
        s.write(Buffer.concat([opt, Buffer.from(name)]));
      }
      if (asked && got.length >= 10) {
        s.off('data', onData);
        resolve(s);
      }
    };
    s.on('data', onData);
  });
}

function read(s: net.Socket, cookie: number, offset: number, length: number): void {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(0, 6); // NBD_CMD_READ
  h.writeBigUInt64BE(BigInt(cookie), 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  s.write(h);
}

async function serveImage(extra = ''): Promise<{ p: RunningProcess; sock: string }> {
  const image = scratch.path('disk.raw');
  await run('qemu-img', ['create', '-f', 'raw', image, '512M']);
  // Data, not holes: the reads cost what they say.
  writeFileSync(image, Buffer.alloc(64 * MiB, 0x5a), { flag: 'r+' });
  const sock = scratch.path('nbd.sock');
  const p = await startServe([
    '--blockdev',
    `driver=file,node-name=f0,filename=${image}`,
    '--blockdev',
    'driver=raw,node-name=d0,file=f0',
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}${extra}`,
    '--export',
    'type=nbd,id=e0,node-name=d0,name=disk',
  ]);
  running.push(p);
  return { p, sock };
}

/** 48 clients, each with `reads` 32 MiB READs it never reads the replies of. */
async function stuckClients(sock: string, reads: number): Promise<net.Socket[]> {
  const clients: net.Socket[] = [];
  for (let i = 0; i < 48; i++) {
    const s = await connect(sock, 'disk');
    s.pause();
    for (let k = 0; k < reads; k++) read(s, k, (k % 2) * 32 * MiB, 32 * MiB);
    clients.push(s);
  }
  return clients;
}

/** Another client reads 64 KiB; resolves once the reply and its data are in. */
async function otherClientReads(sock: string): Promise<void> {
  const s = await connect(sock, 'disk');
  const done = new Promise<void>((resolve, reject) => {
    let n = 0;
    s.on('data', (d: Buffer) => {
      n += d.length;
      if (n >= 16 + 65536) resolve();
    });
    s.on('close', () => reject(new Error('closed before the reply')));
  });
  read(s, 1, 0, 65536);
  await done;
  s.destroy();
}

describe('vm-disk serve idle memory', () => {
  it('one raw NBD export, one client served: under 70 MiB resident (no TLS, metrics or pretty logs loaded)', async () => {
    // Node alone is about 41 MiB and the engine's FFI (koffi) about 10 more; this was 76
    // MiB while prom-client, pino-pretty and node:tls were loaded whether used or not.
    const { p, sock } = await serveImage();
    await otherClientReads(sock);
    const rss = rssMiB(p.child.pid!);
    console.log(`idle RSS ${rss.toFixed(1)} MiB`);
    expect(rss).toBeLessThan(70);
  });
});

describe('vm-disk serve memory under clients that never read', () => {
  it('48 connections x 4 unread 32 MiB reads: within the default budget, others served, memory back after', async () => {
    const { p, sock } = await serveImage();
    const pid = p.child.pid!;
    const before = rssMiB(pid);
    const clients = await stuckClients(sock, 4);
    // 6 GiB asked for. Each client has its share of the budget admitted and one 1 MiB
    // piece of its first reply in memory (the rest of it went to the kernel): wait until
    // they are stuck there (48 MiB and more).
    let during = 0;
    await waitFor(
      'the clients to be stuck',
      () => {
        during = Math.max(during, rssMiB(pid));
        return during >= before + 40;
      },
      60_000,
    );
    await otherClientReads(sock);
    for (let i = 0; i < 20; i++) {
      during = Math.max(during, rssMiB(pid));
      await new Promise((r) => setTimeout(r, 50));
    }
    console.log(`RSS before ${before.toFixed(0)} MiB, during ${during.toFixed(0)} MiB`);
    // The default budget is 256 MiB; what they pin is about 48 MiB.
    expect(during).toBeLessThan(before + 256);
    for (const s of clients) s.destroy();
    let after = during;
    await waitFor(
      'the memory to come back',
      () => {
        after = rssMiB(pid);
        return after < before + 48;
      },
      60_000,
    );
    console.log(`RSS after the clients left ${after.toFixed(0)} MiB`);
    await otherClientReads(sock);
  }, 120_000);

  it('request-memory-budget (a vm-disk extension of --nbd-server) bounds it lower', async () => {
    const { p, sock } = await serveImage(',request-memory-budget=16M');
    const pid = p.child.pid!;
    const before = rssMiB(pid);
    const clients = await stuckClients(sock, 2);
    let during = 0;
    // At most 16 MiB held: the 48 clients cannot all get their first piece.
    await waitFor('the budget to fill', () => rssMiB(pid) > before + 12, 60_000);
    for (let i = 0; i < 40; i++) {
      during = Math.max(during, rssMiB(pid));
      await new Promise((r) => setTimeout(r, 50));
    }
    console.log(
      `RSS with a 16 MiB budget: before ${before.toFixed(0)} MiB, during ${during.toFixed(0)} MiB`,
    );
    expect(during).toBeLessThan(before + 16 + 32);
    for (const s of clients) s.destroy();
    await waitFor('the memory to come back', () => rssMiB(pid) < before + 48, 60_000);
    await otherClientReads(sock);
  }, 120_000);

  it('nbd-server-start takes request-memory-budget too, and refuses a budget of 0', async () => {
    const qmp = scratch.path('qmp.sock');
    const p = await startServe([...monitorArgs(qmp)]);
    running.push(p);
    const { client } = await QmpTestClient.connect(qmp);
    try {
      await client.execute({ execute: 'qmp_capabilities' });
      const start = (budget: unknown) =>
        client.execute({
          execute: 'nbd-server-start',
          arguments: {
            addr: { type: 'unix', data: { path: scratch.path('nbd.sock') } },
            'request-memory-budget': budget,
          },
        });
      expect(await start(0)).toEqual({
        error: {
          class: 'GenericError',
          desc: "Parameter 'request-memory-budget' expects a size of at least 1 byte",
        },
      });
      expect(await start(64 * MiB)).toEqual({ return: {} });
    } finally {
      client.close();
    }
  });
});
