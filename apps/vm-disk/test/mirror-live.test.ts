// Mirror under live I/O: a client writes through the source's NBD export while the job
// copies, the job is completed (pivot) and the client goes on writing, now to the target;
// afterwards the target holds every acknowledged write. Then live storage migration: the
// target is an `nbd` node on a second daemon (vm-disk, and qemu-storage-daemon).

import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-mirror-live-');
const MiB = 1 << 20;

/** Events seen by `ok` (execute drops them), per client, for `until`. */
const seen = new WeakMap<QmpTestClient, QmpMessage[]>();

async function qmp(path: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(path);
  seen.set(client, []);
  await ok(client, 'qmp_capabilities', {});
  return client;
}

async function ok(c: QmpTestClient, execute: string, args: Record<string, unknown>): Promise<void> {
  c.sendRaw(`${JSON.stringify({ execute, arguments: args })}\n`);
  for (;;) {
    const m = await c.next(60_000);
    if ('event' in m) seen.get(c)!.push(m);
    else return void expect(m).toEqual({ return: {} });
  }
}

/** Waits for the event (with that job status), among those seen already first. */
async function until(c: QmpTestClient, event: string, status?: string): Promise<void> {
  const match = (m: QmpMessage): boolean =>
    m.event === event &&
    (status === undefined || (m.data as { status?: string } | undefined)?.status === status);
  const earlier = seen.get(c)!;
  const i = earlier.findIndex(match);
  if (i >= 0) {
    earlier.splice(0, i + 1);
    return;
  }
  earlier.length = 0;
  while (!match(await c.next(60_000)));
}

const daemonArgs = (qmpPath: string, sock: string, image: string): string[] => [
  '--chardev',
  `socket,id=m0,path=${qmpPath},server=on,wait=off`,
  '--monitor',
  'chardev=m0',
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  'driver=qcow2,node-name=d0,file=f0',
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

/**
 * Mirrors d0 of the daemon at `qmpPath` to `target` (a node there) while qemu-io writes
 * 64 KiB patterns through its export, before ready, after ready and after the pivot;
 * returns the writes made, as [pattern, offset].
 */
async function mirrorUnderWrites(
  qmpPath: string,
  sock: string,
  target: string,
  copyMode: 'background' | 'write-blocking',
): Promise<[number, number][]> {
  const c = await qmp(qmpPath);
  const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
  const writes: [number, number][] = [];
  let n = 0;
  const write = async (): Promise<void> => {
    n++;
    // Spread over the disk, crossing granules, never overlapping an earlier write.
    const offset = 8 * MiB + n * 3 * 65536 + (n % 7) * 4096;
    const out = await io.command(`write -P ${n} ${offset} 64k`);
    expect(out).toContain('wrote 65536/65536');
    writes.push([n, offset]);
  };
  // Slow enough that writes land while the copy runs.
  await ok(c, 'blockdev-mirror', {
    'job-id': 'm',
    device: 'd0',
    target,
    sync: 'full',
    speed: 8 * MiB,
    'copy-mode': copyMode,
  });
  for (let i = 0; i < 10; i++) await write();
  await ok(c, 'block-job-set-speed', { device: 'm', speed: 0 });
  for (let i = 0; i < 5; i++) await write();
  await until(c, 'BLOCK_JOB_READY');
  for (let i = 0; i < 5; i++) await write();
  const pivot = ok(c, 'block-job-complete', { device: 'm' });
  // A write in flight across the pivot (qemu-io runs one command at a time): not lost.
  await Promise.all([pivot, write()]);
  await until(c, 'JOB_STATUS_CHANGE', 'null');
  for (let i = 0; i < 5; i++) await write();
  await io.command('flush');
  await io.kill();
  await ok(c, 'quit', {});
  c.close();
  return writes;
}

/** Checks `image` (qcow2) holds the source's first 8 MiB (0x11) and every write. */
async function verify(image: string, writes: [number, number][]): Promise<void> {
  const cmds = ['-c', 'read -P 0x11 0 8M'];
  for (const [p, off] of writes) cmds.push('-c', `read -P ${p} ${off} 64k`);
  const out = await run('qemu-io', ['-r', '-f', 'qcow2', ...cmds, image]);
  expect(out).not.toMatch(/Pattern verification failed/);
  await run('qemu-img', ['check', image]);
}

async function images(): Promise<{ src: string; dst: string }> {
  const src = scratch.path('src.qcow2');
  const dst = scratch.path('dst.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 8M', src]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', dst, '64M']);
  return { src, dst };
}

describe('mirror under live I/O', () => {
  for (const mode of ['background', 'write-blocking'] as const) {
    it(`copy-mode ${mode}: every acknowledged write is on the target after the pivot`, async () => {
      const { src, dst } = await images();
      const q = scratch.path('a.qmp');
      const sock = scratch.path('a.sock');
      const a = await scratch.serve([
        ...daemonArgs(q, sock, src),
        '--blockdev',
        `driver=qcow2,node-name=t0,file.driver=file,file.filename=${dst}`,
      ]);
      const writes = await mirrorUnderWrites(q, sock, 't0', mode);
      await a.exited;
      await verify(dst, writes);
    });
  }

  for (const peer of ['vm-disk', 'qemu-storage-daemon'] as const) {
    it(`live storage migration over NBD to ${peer}: the target holds every byte`, async () => {
      const { src, dst } = await images();
      const qb = scratch.path('b.qmp');
      const sockB = scratch.path('b.sock');
      const argsB = daemonArgs(qb, sockB, dst);
      const b = peer === 'vm-disk' ? await startServe(argsB) : await startQsd(argsB, sockB);
      scratch.running.push(b);
      const qa = scratch.path('a.qmp');
      const sockA = scratch.path('a.sock');
      const a = await scratch.serve(daemonArgs(qa, sockA, src));
      const c = await qmp(qa);
      await ok(c, 'blockdev-add', {
        driver: 'nbd',
        'node-name': 'remote',
        server: { type: 'unix', path: sockB },
        export: 'disk',
      });
      c.close();
      const writes = await mirrorUnderWrites(qa, sockA, 'remote', 'background');
      await a.exited;
      const cb = await qmp(qb);
      await ok(cb, 'quit', {});
      cb.close();
      await b.exited;
      await verify(dst, writes);
    });
  }
});
