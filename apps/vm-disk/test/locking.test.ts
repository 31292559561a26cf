// Image locking between vm-disk and QEMU's tools, both directions, as run side by side:
// who holds an image, who tries to open it, and what they are told. The matrix of the
// issue: vm-disk vs vm-disk, vm-disk holding with qemu-io/qemu-img/qemu-storage-daemon
// refused, qemu-storage-daemon holding with vm-disk refused, and locks released when the
// permission goes (an export removed, a node deleted).

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { lockedBytes } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import {
  CLI,
  monitorArgs,
  type RunningProcess,
  run,
  start,
  startQsd,
  useScratch,
} from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-locking-');
const { running, serve } = scratch;

const WRITE_LOCK = 'Failed to get "write" lock';
const SHARED_WRITE_LOCK = 'Failed to get shared "write" lock';
const hint = (path: string) => `Is another process using the image [${path}]?`;

/** qemu-storage-daemon holding the qcow2 `image` writable, with its monitor on `qmp`. */
async function qsdHolding(image: string, qmp: string): Promise<RunningProcess> {
  // qemu-storage-daemon opens its blockdevs before it creates the monitor socket.
  const qsd = await startQsd(
    [
      '--blockdev',
      `driver=file,node-name=f0,filename=${image}`,
      '--blockdev',
      'driver=qcow2,node-name=d0,file=f0',
      ...monitorArgs(qmp),
    ],
    qmp,
  );
  running.push(qsd);
  return qsd;
}

function qcow2Args(image: string, sock: string, writable = true): string[] {
  return [
    '--blockdev',
    `driver=file,node-name=f0,filename=${image}`,
    '--blockdev',
    `driver=qcow2,node-name=d0,file=f0,read-only=${writable ? 'off' : 'on'}`,
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}`,
    '--export',
    `type=nbd,id=e0,node-name=d0,name=disk,writable=${writable ? 'on' : 'off'}`,
  ];
}

/** A command expected to fail: its status and stderr. */
function refused(command: string, args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(command, args, { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stderr: r.stderr };
}

/** vm-disk serve expected to exit at once: its status and stderr. */
async function serveRefused(args: string[]): Promise<{ status: number | string; stderr: string }> {
  const p = start(process.execPath, [CLI, 'serve', ...args]);
  running.push(p);
  const status = await p.exited;
  return { status, stderr: p.stderr() };
}

describe('image locking against QEMU', () => {
  it('vm-disk serving an image writable refuses a second vm-disk, qemu-io, qemu-img and qemu-storage-daemon', async () => {
    const image = scratch.path('disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', image, '16M']);
    await serve(qcow2Args(image, scratch.path('a.sock')));

    const second = await serveRefused(qcow2Args(image, scratch.path('b.sock')));
    expect(second.status).toBe(1);
    expect(second.stderr).toContain(WRITE_LOCK);
    expect(second.stderr).toContain('ERR_VMDISK_BLOCK_IMAGE_LOCKED');
    expect(second.stderr).toContain(hint(image));
    // Even read-only: a reader that does not share write is refused, as QEMU's are.
    const reader = await serveRefused(qcow2Args(image, scratch.path('c.sock'), false));
    expect(reader.stderr).toContain(SHARED_WRITE_LOCK);

    const io = refused('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', image]);
    expect(io.status).not.toBe(0);
    expect(io.stderr).toContain(WRITE_LOCK);
    expect(io.stderr).toContain(hint(image));
    const img = refused('qemu-img', ['info', image]);
    expect(img.status).not.toBe(0);
    expect(img.stderr).toContain(SHARED_WRITE_LOCK);
    const qsd = refused('qemu-storage-daemon', [
      '--blockdev',
      `driver=file,node-name=f0,filename=${image}`,
      '--blockdev',
      'driver=qcow2,node-name=d0,file=f0',
    ]);
    expect(qsd.status).not.toBe(0);
    expect(qsd.stderr).toContain(WRITE_LOCK);

    // vm-disk info and map: refused as qemu-img is, read with -U as qemu-img -U reads.
    const info = refused(process.execPath, [CLI, 'info', image]);
    expect(info.status).toBe(1);
    expect(info.stderr).toContain(`Could not open '${image}': ${SHARED_WRITE_LOCK}`);
    expect(info.stderr).toContain(hint(image));
    const map = refused(process.execPath, [CLI, 'map', image]);
    expect(map.stderr).toContain(SHARED_WRITE_LOCK);
    const infoU = JSON.parse(
      await run(process.execPath, [CLI, 'info', '-U', '--output=json', image]),
    );
    expect(infoU['virtual-size']).toBe(16 << 20);
    const mapU = await run(process.execPath, [CLI, 'map', '--force-share', '--output=json', image]);
    expect(JSON.parse(mapU)).toEqual(
      JSON.parse(await run('qemu-img', ['map', '-U', '--output=json', image])).map(
        ({ offset, ...e }: Record<string, unknown>) => {
          void offset;
          return e;
        },
      ),
    );
  });

  it('vm-disk create refuses to overwrite an image another process uses, and leaves it as it was', async () => {
    const image = scratch.path('in-use.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', image, '16M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 64k', image]);
    const before = readFileSync(image);
    await serve(qcow2Args(image, scratch.path('a.sock')));
    for (const fmt of ['qcow2', 'raw']) {
      const r = refused(process.execPath, [CLI, 'create', '-f', fmt, image, '1M']);
      expect(r.status).toBe(1);
      expect(r.stderr).toContain(WRITE_LOCK);
      expect(r.stderr).toContain(hint(image));
      expect(readFileSync(image).equals(before)).toBe(true);
    }
    // qemu-img refuses the same way.
    expect(refused('qemu-img', ['create', '-f', 'qcow2', image, '1M']).stderr).toContain(
      WRITE_LOCK,
    );
  });

  it('qemu-storage-daemon serving an image writable refuses vm-disk serve, info and map', async () => {
    const image = scratch.path('disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', image, '16M']);
    const qmp = scratch.path('qsd.qmp');
    const qsd = await qsdHolding(image, qmp);
    const r = await serveRefused(qcow2Args(image, scratch.path('b.sock')));
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(WRITE_LOCK);
    expect(r.stderr).toContain(hint(image));
    expect(refused(process.execPath, [CLI, 'info', image]).stderr).toContain(SHARED_WRITE_LOCK);
    expect(refused(process.execPath, [CLI, 'map', image]).stderr).toContain(SHARED_WRITE_LOCK);
    expect(refused(process.execPath, [CLI, 'info', '-U', image]).status).toBe(0);
    await qsd.stop('SIGTERM');
    // Gone: vm-disk may have it now.
    await serve(qcow2Args(image, scratch.path('c.sock')));
  });

  it('gives the write lock back when the export that took it is removed; refuses a blockdev-add over QMP', async () => {
    const image = scratch.path('disk.raw');
    await run('qemu-img', ['create', '-f', 'raw', image, '16M']);
    const qmpPath = scratch.path('qmp.sock');
    await serve([
      '--blockdev',
      `driver=file,node-name=f0,filename=${image}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0',
      '--nbd-server',
      `addr.type=unix,addr.path=${scratch.path('nbd.sock')}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
      ...monitorArgs(qmpPath),
    ]);
    // A writable export of a raw node: reads and writes, and shares all but resize (qemu-io
    // may write beside it, as beside QEMU's exports; qemu-storage-daemon locks the same).
    expect(lockedBytes(image)).toEqual([100, 101, 203]);
    const { client } = await QmpTestClient.connect(qmpPath);
    try {
      await client.execute({ execute: 'qmp_capabilities' });
      expect(
        await client.execute({ execute: 'block-export-del', arguments: { id: 'e0' } }),
      ).toEqual({ return: {} });
      // No client was attached: the export is gone before the reply (BLOCK_EXPORT_DELETED
      // comes first, as in QEMU). A raw node nobody uses holds nothing, as in QEMU.
      expect(lockedBytes(image)).toEqual([]);
      const add = await client.execute({
        execute: 'block-export-add',
        arguments: { type: 'nbd', id: 'e1', 'node-name': 'd0', name: 'disk', writable: false },
      });
      expect(add).toEqual({ return: {} });
      expect(lockedBytes(image)).toEqual([100, 203]);
      // A blockdev-add that would write an image qemu-io holds is refused over QMP, with
      // QEMU's message and no hint.
      const other = scratch.path('other.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', other, '1M']);
      const holderQmp = scratch.path('holder.qmp');
      await qsdHolding(other, holderQmp);
      const refusedAdd = await client.execute({
        execute: 'blockdev-add',
        arguments: {
          driver: 'qcow2',
          'node-name': 'o0',
          file: { driver: 'file', filename: other },
        },
      });
      expect(refusedAdd).toEqual({ error: { class: 'GenericError', desc: WRITE_LOCK } });
      // Nothing of the refused node stays: no node, no lock byte beside the holder's.
      const nodes = (await client.execute({ execute: 'query-named-block-nodes' })).return as {
        'node-name': string;
      }[];
      expect(nodes.map((n) => n['node-name']).sort()).toEqual(['d0', 'f0']);
      expect(lockedBytes(other)).toEqual([100, 101, 103, 201, 203]);
      // blockdev-create over it: the job fails before truncating anything.
      const created = await client.execute({
        execute: 'blockdev-create',
        arguments: { 'job-id': 'c0', options: { driver: 'file', filename: other, size: 65536 } },
      });
      expect(created).toEqual({ return: {} });
      for (;;) {
        const ev = await client.next();
        if (
          ev.event === 'JOB_STATUS_CHANGE' &&
          (ev.data as { status: string }).status === 'concluded'
        )
          break;
      }
      const jobs = (await client.execute({ execute: 'query-jobs' })).return as {
        id: string;
        error?: string;
      }[];
      expect(jobs.find((j) => j.id === 'c0')?.error).toBe(WRITE_LOCK);
      await run('qemu-img', ['check', '-U', other]);
    } finally {
      client.close();
    }
  });
});
