// vhost-user-blk exports of `vm-disk serve`, side by side with qemu-storage-daemon 7.2 on
// the same command line and the same QMP: the errors for bad options, block-export-add,
// query-block-exports, block-export-del with a front-end connected (disconnected in either
// mode, the event before the reply), and the same front-end session (the raw client of
// @vmdisk/vhost-user's tests, run as a process) leaving the same qcow2 image.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, startServe, useScratch, waitFor } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-vhost-');
const { running } = scratch;

/** The raw vhost-user front-end session (a script of @vmdisk/vhost-user's tests). */
const RAW_CLIENT = fileURLToPath(
  new URL('../../../packages/vhost-user/test/raw-client-run.ts', import.meta.url),
);

const args = (image: string, qmp: string, sock: string) => [
  ...monitorArgs(qmp),
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  'driver=qcow2,node-name=d0,file=f0',
  '--blockdev',
  `driver=file,node-name=ro0,filename=${image},read-only=on,locking=off`,
  '--export',
  `type=vhost-user-blk,id=boot,node-name=d0,addr.type=unix,addr.path=${sock}`,
];

const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage => rest;

/** A front-end session held open: its JSON summary, and its end. */
async function holdSession(sock: string): Promise<{ summary: unknown; closed: Promise<void> }> {
  const child: ChildProcess = spawn(process.execPath, [RAW_CLIENT, sock, '--hold']);
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d;
  });
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    err += d;
  });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  await waitFor('the raw client to hold', () => out.includes('holding') || child.exitCode !== null);
  if (!out.includes('holding')) throw new Error(`raw client failed: ${err}`);
  return {
    summary: JSON.parse(out.split('\n')[0]!),
    closed: exited.then(() => {
      if (!out.includes('closed')) throw new Error(`raw client: ${err}`);
    }),
  };
}

async function scenario(qmp: string, dir: string): Promise<{ seen: unknown[]; features: bigint }> {
  const seen: unknown[] = [];
  let features = 0n;
  const { client } = await QmpTestClient.connect(qmp);
  const send = (execute: string, a?: Record<string, unknown>) =>
    client.sendRaw(`${JSON.stringify({ execute, ...(a && { arguments: a }) })}\n`);
  const next = async () => bare(await client.next());
  const unix = { type: 'unix', path: `${dir}/e0.sock` };
  const add = (extra: Record<string, unknown>) =>
    send('block-export-add', { type: 'vhost-user-blk', id: 'e0', 'node-name': 'd0', ...extra });
  try {
    await client.execute({ execute: 'qmp_capabilities' });
    const bad: Record<string, unknown>[] = [
      { addr: unix, 'node-name': 'ro0', writable: true },
      { addr: unix, 'logical-block-size': 1000 },
      { addr: unix, 'logical-block-size': 256 },
      { addr: unix, 'logical-block-size': 4 * 1024 * 1024 },
      { addr: { type: 'inet', host: '127.0.0.1', port: '5000' } },
      { addr: unix, 'num-queues': 0 },
      { addr: unix, 'num-queues': 70000 },
      {},
      { addr: unix, 'node-name': 'nx' },
      { addr: { type: 'unix', path: `${dir}/nonexistent/e0.sock` } },
      { addr: unix, id: 'boot' },
      { addr: unix, name: 'x' },
    ];
    for (const b of bad) {
      add(b);
      seen.push(await next());
    }
    add({ addr: unix, writable: true, 'logical-block-size': 4096, 'num-queues': 2 });
    seen.push(await next());
    send('query-block-exports');
    seen.push(await next());
    // A front-end attached: block-export-del disconnects it; the event comes first.
    const session = await holdSession(unix.path);
    const { features: f, protocol: _, ...summary } = session.summary as Record<string, string>;
    features = BigInt(`0x${f}`);
    seen.push(summary);
    send('block-export-del', { id: 'e0' });
    seen.push(await next(), await next());
    await session.closed;
    send('query-block-exports');
    seen.push(await next());
    send('block-export-del', { id: 'e0', mode: 'hard' });
    seen.push(await next());
  } finally {
    client.close();
  }
  return { seen, features };
}

describe('vhost-user-blk exports', () => {
  it('are added, refused, listed and deleted as qemu-storage-daemon does, and serve the same', async () => {
    const theirs = scratch.path('theirs.qcow2');
    const ours = scratch.path('ours.qcow2');
    for (const f of [theirs, ours]) await run('qemu-img', ['create', '-f', 'qcow2', f, '4M']);
    for (const d of ['qsd', 'ours']) mkdirSync(scratch.path(d));
    const qsdQmp = scratch.path('qsd.qmp');
    running.push(await startQsd(args(theirs, qsdQmp, scratch.path('qsd-boot.sock')), qsdQmp));
    const { seen: theirAnswers, features: theirFeatures } = await scenario(
      qsdQmp,
      `${scratch.dir}/qsd`,
    );
    const ourQmp = scratch.path('ours.qmp');
    running.push(await startServe(args(ours, ourQmp, scratch.path('ours-boot.sock'))));
    const { seen: ourAnswers, features: ourFeatures } = await scenario(
      ourQmp,
      `${scratch.dir}/ours`,
    );

    const error = (desc: string) => ({ error: { class: 'GenericError', desc } });
    const e0 = { type: 'vhost-user-blk', id: 'e0', 'node-name': 'd0', 'shutting-down': false };
    const boot = { ...e0, id: 'boot' };
    expect(theirAnswers).toEqual([
      error('Cannot export read-only node as writable'),
      error("Property e0.logical-block-size doesn't take value '1000', it's not a power of 2"),
      error(
        "Property e0.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)",
      ),
      error(
        "Property e0.logical-block-size doesn't take value 4194304 (minimum: 512, maximum: 2097152)",
      ),
      error("Only socket address types 'unix' and 'fd' are supported"),
      error('num-queues must be greater than 0'),
      error("Parameter 'num-queues' expects uint16_t"),
      error("Parameter 'addr' is missing"),
      error("Cannot find device='' nor node-name='nx'"),
      error(
        `Failed to bind socket to ${scratch.dir}/qsd/nonexistent/e0.sock: No such file or directory`,
      ),
      error("Block export id 'boot' is already in use"),
      error("Parameter 'name' is unexpected"),
      { return: {} },
      { return: [e0, boot] },
      expect.objectContaining({ queues: 2 }),
      { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e0' } },
      { return: {} },
      { return: [boot] },
      error("Export 'e0' is not found"),
    ]);
    expect(JSON.parse(JSON.stringify(ourAnswers).replaceAll('/ours/', '/qsd/'))).toEqual(
      theirAnswers,
    );
    // Features: qemu-storage-daemon's but SIZE_MAX (1), NOTIFY_ON_EMPTY (24) and LOG_ALL
    // (26), which vm-disk leaves out.
    const notOffered = (1n << 1n) | (1n << 24n) | (1n << 26n);
    expect(ourFeatures).toBe(theirFeatures & ~notOffered);
    for (const p of running.splice(0)) await p.stop('SIGTERM');
    await run('qemu-img', ['check', ours]);
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs]);
  });

  it('listens again at the same path after a kill -9 left the socket behind', async () => {
    const image = scratch.path('disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', image, '4M']);
    const sock = scratch.path('vhost.sock');
    const first = await startServe(args(image, scratch.path('1.qmp'), sock));
    await first.stop('SIGKILL');
    expect(existsSync(sock)).toBe(true); // stale: nobody listens there
    running.push(await startServe(args(image, scratch.path('2.qmp'), sock)));
    const session = await holdSession(sock);
    // The export of args() is read-only: reads are served, writes refused with IOERR.
    expect(session.summary).toMatchObject({
      memTable: 0,
      results: { read: { status: 0 }, write: { status: 1 }, getId: { status: 0 } },
    });
  });
});
