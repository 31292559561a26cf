// iothreads (`--object iothread,id=`, an export's `iothread=`): the connections of an
// export served in an iothread do their protocol work in its worker; what they read and
// write is the same as on the main thread (real peers: qemu-io, nbdinfo); a worker that
// dies is a clear error and the daemon goes on; no fd is left behind.
import { readdirSync, readlinkSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { QemuIoSession } from '@vmdisk/test-support';
import { afterEach, describe, expect, it } from 'vitest';
import type { Daemon } from '../src/daemon.ts';
import { createLogger } from '../src/log.ts';
import { parseServeOptions } from '../src/options/serve-options.ts';
import { startDaemon } from '../src/root.ts';
import { run, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-iothreads-');
const daemons: Daemon[] = [];
afterEach(async () => {
  for (const d of daemons.splice(0)) await d.stop();
});

/** A daemon in this process (its workers are threads of it), and its log lines. */
async function serve(args: string[]): Promise<{ daemon: Daemon; log: Record<string, unknown>[] }> {
  const log: Record<string, unknown>[] = [];
  const stream = new PassThrough();
  stream.on('data', (line: Buffer) => {
    for (const l of line.toString().split('\n')) if (l !== '') log.push(JSON.parse(l));
  });
  process.env.VMDISK_LOG_FORMAT = 'json';
  const daemon = await startDaemon(parseServeOptions(args), createLogger({ stream }));
  daemons.push(daemon);
  return { daemon, log };
}

/** The process's socket fds (a connection handed to a worker is a dup of one). */
const sockets = (): number =>
  readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`).startsWith('socket:');
    } catch {
      return false;
    }
  }).length;

async function image(name: string, size = '16M'): Promise<string> {
  const path = scratch.path(name);
  await run('qemu-img', ['create', '-f', 'raw', path, size]);
  return path;
}

describe('iothreads', () => {
  it('serves an export in an iothread: data written is read back, by the worker', async () => {
    const img = await image('a.raw');
    const sock = scratch.path('nbd.sock');
    const { daemon } = await serve([
      '--object',
      'iothread,id=io0',
      '--blockdev',
      `driver=file,node-name=f0,filename=${img}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on,iothread=io0',
    ]);
    const before = sockets();
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    try {
      expect(daemon.iothreads.get('io0')?.connections).toBe(1);
      // raw over file, nothing above it: the worker reads the file itself.
      expect(daemon.iothreads.fastReads('disk')).toBe(true);
      expect(await io.command('write -P 0x5a 64k 256k')).toMatch(/wrote 262144\/262144/);
      expect(await io.command('read -P 0x5a 64k 256k')).toMatch(/read 262144\/262144/);
      expect(await io.command('read -P 0 0 64k')).toMatch(/read 65536\/65536/);
    } finally {
      await io.kill();
    }
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 64k 256k', img]);
    expect(out).toMatch(/read 262144\/262144/);
    // The connection's fd (the worker's dup) is closed with it.
    await expect.poll(() => daemon.iothreads.get('io0')?.connections).toBe(0);
    await expect.poll(sockets).toBe(before);
    // Unlike QEMU 7.2 (which deletes it and then crashes), an iothread in use stays.
    await expect(daemon.objectDel('io0')).rejects.toThrow(
      "object 'io0' is in use, can not be deleted",
    );
    await daemon.blockExportDel('e0');
    await daemon.objectDel('io0');
    expect(daemon.iothreads.get('io0')).toBeUndefined();
  });

  it('a worker that dies: a clear error, its clients gone, the daemon serves on', async () => {
    const img = await image('b.raw');
    const other = await image('c.raw');
    const sock = scratch.path('nbd2.sock');
    const { daemon, log } = await serve([
      '--object',
      'iothread,id=io0',
      '--blockdev',
      `driver=file,node-name=f0,filename=${img}`,
      '--blockdev',
      `driver=file,node-name=f1,filename=${other}`,
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=f0,name=in-thread,writable=on,iothread=io0',
      '--export',
      'type=nbd,id=e1,node-name=f1,name=on-main,writable=on',
    ]);
    const inThread = await QemuIoSession.open([
      '-f',
      'raw',
      `nbd+unix:///in-thread?socket=${sock}`,
    ]);
    const onMain = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///on-main?socket=${sock}`]);
    try {
      expect(await inThread.command('write -P 0x11 0 64k')).toMatch(/wrote 65536/);
      const io0 = daemon.iothreads.get('io0')!;
      await io0.worker.terminate();
      await expect
        .poll(() => log.find((l) => l.event === 'iothread-failed'))
        .toMatchObject({ level: 50, id: 'io0', error: 'the worker exited (code 1)' });
      expect(io0.connections).toBe(0);
      expect(await inThread.command('read 0 4k')).toMatch(/read failed/);
      expect(await onMain.command('write -P 0x22 0 64k')).toMatch(/wrote 65536/);
      expect(await onMain.command('read -P 0x22 0 64k')).toMatch(/read 65536/);
    } finally {
      await inThread.kill();
      await onMain.kill();
    }
    // New clients of the export are served on the main thread.
    const again = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0x11 0 64k',
      `nbd+unix:///in-thread?socket=${sock}`,
    ]);
    expect(again).toMatch(/read 65536\/65536/);
    await daemon.blockExportDel('e0');
    expect(daemon.queryBlockExports().map((e) => e.id)).toEqual(['e1']);
  });

  it('a bitmap added and a mirror started while the worker serves: every write is seen', async () => {
    const src = await image('src.raw');
    const dst = await image('dst.raw');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 8M', src]);
    const sock = scratch.path('nbd3.sock');
    const qmpPath = scratch.path('qmp3.sock');
    const { daemon } = await serve([
      '--chardev',
      `socket,id=m0,path=${qmpPath},server=on,wait=off`,
      '--monitor',
      'chardev=m0',
      '--object',
      'iothread,id=io0',
      '--blockdev',
      `driver=file,node-name=f0,filename=${src}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0',
      '--blockdev',
      `driver=file,node-name=ft,filename=${dst}`,
      '--blockdev',
      'driver=raw,node-name=dt,file=ft',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on,iothread=io0',
    ]);
    const { client } = await QmpTestClient.connect(qmpPath);
    const events: QmpMessage[] = [];
    const ok = async (execute: string, args: Record<string, unknown> = {}) => {
      client.sendRaw(`${JSON.stringify({ execute, arguments: args })}\n`);
      for (;;) {
        const m = await client.next(60_000);
        if ('event' in m) events.push(m);
        else return void expect(m).toEqual({ return: {} });
      }
    };
    const until = async (match: (m: QmpMessage) => boolean) => {
      if (events.some(match)) return;
      while (!match(await client.next(60_000)));
    };
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    const writes: [number, number][] = [];
    const write = async () => {
      const n = writes.length + 1;
      const offset = 8 * 2 ** 20 + n * 3 * 65536;
      expect(await io.command(`write -P ${n} ${offset} 64k`)).toContain('wrote 65536/65536');
      writes.push([n, offset]);
    };
    try {
      await ok('qmp_capabilities');
      expect(await io.command('read -P 0x11 0 8M')).toContain('read 8388608/8388608');
      expect(daemon.iothreads.fastReads('disk')).toBe(true);
      // A bitmap added while the worker serves: the writes after it are all in it.
      await ok('block-dirty-bitmap-add', { node: 'd0', name: 'b0' });
      for (let i = 0; i < 3; i++) await write();
      expect(daemon.graph.node('d0').findDirtyBitmap('b0')?.count()).toBe(3 * 65536);
      // A mirror started while it serves: its filter is above the node, the worker's
      // reads stop (drained across threads) and every write goes through the job.
      await ok('blockdev-mirror', {
        'job-id': 'm',
        device: 'd0',
        target: 'dt',
        sync: 'full',
        speed: 8 * 2 ** 20,
      });
      expect(daemon.iothreads.fastReads('disk')).toBe(false);
      for (let i = 0; i < 5; i++) await write();
      await ok('block-job-set-speed', { device: 'm', speed: 0 });
      await until((m) => m.event === 'BLOCK_JOB_READY');
      for (let i = 0; i < 3; i++) await write();
      await ok('block-job-complete', { device: 'm' });
      await until(
        (m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { status?: string }).status === 'null',
      );
      // After the pivot the export reads the target: never the old file.
      for (let i = 0; i < 3; i++) await write();
      for (const [n, off] of writes) {
        expect(await io.command(`read -P ${n} ${off} 64k`)).toContain('read 65536/65536');
      }
      expect(daemon.iothreads.fastReads('disk')).toBe(false);
      expect(daemon.graph.node('d0').findDirtyBitmap('b0')?.count()).toBe(11 * 65536);
      await io.command('flush');
    } finally {
      await io.kill();
      client.close();
    }
    const cmds = ['-c', 'read -P 0x11 0 8M'];
    for (const [n, off] of writes) cmds.push('-c', `read -P ${n} ${off} 64k`);
    const out = await run('qemu-io', ['-r', '-f', 'raw', ...cmds, dst]);
    expect(out).not.toMatch(/Pattern verification failed/);
  });

  it('multi-queue: connections round-robin over a list of iothreads; a qcow2 node takes one', async () => {
    const img = await image('mq.raw');
    const q = scratch.path('mq.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '16M']);
    const sock = scratch.path('nbd4.sock');
    const { daemon } = await serve([
      '--object',
      'iothread,id=io0',
      '--object',
      'iothread,id=io1',
      '--blockdev',
      `driver=file,node-name=f0,filename=${img}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0',
      '--blockdev',
      `driver=file,node-name=fq,filename=${q}`,
      '--blockdev',
      'driver=qcow2,node-name=dq,file=fq',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on,iothread.0=io0,iothread.1=io1',
    ]);
    const a = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    const b = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    try {
      expect(daemon.iothreads.get('io0')?.connections).toBe(1);
      expect(daemon.iothreads.get('io1')?.connections).toBe(1);
      expect(await a.command('write -P 0x7 0 1M')).toContain('wrote 1048576/1048576');
      // Written through one iothread, read through the other.
      expect(await b.command('read -P 0x7 0 1M')).toContain('read 1048576/1048576');
    } finally {
      await a.kill();
      await b.kill();
    }
    await expect(
      daemon.blockExportAdd({
        type: 'nbd',
        id: 'eq',
        nodeName: 'dq',
        writable: false,
        allocationDepth: false,
        iothread: { ids: ['io0', 'io1'], list: true },
      }),
    ).rejects.toThrow("Invalid parameter type for 'iothread', expected: string");
    await daemon.blockExportAdd({
      type: 'nbd',
      id: 'eq',
      nodeName: 'dq',
      writable: true,
      allocationDepth: false,
      iothread: { ids: ['io1'], list: false },
    });
    const out = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x9 64k 64k',
      '-c',
      'read -P 0x9 64k 64k',
      `nbd+unix:///dq?socket=${sock}`,
    ]);
    expect(out).toContain('read 65536/65536');
    expect(daemon.iothreads.fastReads('dq')).toBe(false);
  });

  it('fio writes and verifies through two connections spread over two iothreads', async () => {
    const img = await image('fio.raw');
    const sock = scratch.path('nbd5.sock');
    await serve([
      '--object',
      'iothread,id=io0',
      '--object',
      'iothread,id=io1',
      '--blockdev',
      `driver=file,node-name=f0,filename=${img}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      '{"type":"nbd","id":"e0","node-name":"d0","name":"disk","writable":true,"iothread":["io0","io1"]}',
    ]);
    // Each job its own half of the disk (its own connection): written, then read back
    // and checked, with reads served by the worker from the file.
    const out = await run('fio', [
      '--name=verify',
      '--ioengine=nbd',
      `--uri=nbd+unix:///disk?socket=${sock}`,
      '--rw=randwrite',
      '--bs=4k,64k',
      '--iodepth=16',
      '--numjobs=2',
      '--size=8M',
      '--offset_increment=8M',
      '--verify=crc32c',
      '--do_verify=1',
      // No verify state file left in the working directory.
      '--verify_state_save=0',
      '--output-format=json',
    ]);
    const jobs = (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number }[] }).jobs;
    expect(jobs.map((j) => j.error)).toEqual([0, 0]);
  });
});
