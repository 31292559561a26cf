// The FUSE export (`--export type=fuse`), side by side with qemu-storage-daemon 7.2's on
// copies of the same image: the node appears as a regular file over the mount point; what
// qemu-img, qemu-io, fallocate, truncate, dd and chmod see and do there, and what reaches
// the image, must be the same. Then the mount's lifecycle: block-export-add/del and their
// errors, SIGTERM, and kill -9 (no stale mount left, where qemu-storage-daemon leaves one).
import { execFile } from 'node:child_process';
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import {
  monitorArgs,
  type RunningProcess,
  run,
  startQsd,
  startServe,
  useScratch,
  waitFor,
} from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-fuse-');
const exec = promisify(execFile);
type Which = 'qsd' | 'vm-disk';

/** Whether `path` is a mount point now (this process's /proc/self/mountinfo). */
function mounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path);
}

/** A command's exit status and output (stderr with the directory taken out), never throwing. */
async function sh(dir: string, cmd: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await exec(cmd, args, { cwd: dir });
    // qemu-io's timings are the only thing that differs from run to run.
    return `0 ${stdout.replace(/\n.*ops;.*/g, '').trim()}`;
  } catch (e) {
    const err = e as { code?: number; stderr?: string };
    return `${err.code} ${(err.stderr ?? '').trim().replaceAll(dir, '.')}`;
  }
}

/** Starts one daemon with `args` (a QMP monitor added) and waits for its mount. */
async function startDaemon(which: Which, dir: string, args: string[]): Promise<RunningProcess> {
  const qmp = `${dir}/qmp.sock`;
  const all = [...monitorArgs(qmp), ...args];
  const p = which === 'qsd' ? await startQsd(all, qmp) : await startServe(all);
  scratch.running.push(p);
  if (args.some((a) => a.includes('type=fuse'))) {
    await waitFor('the FUSE mount', () => mounted(`${dir}/mnt`));
  }
  return p;
}

/** Stops a daemon with SIGTERM; its mount must be gone by the time it has exited. */
async function stopDaemon(p: RunningProcess, dir: string): Promise<void> {
  expect(await p.stop('SIGTERM')).toBe(0);
  expect(mounted(`${dir}/mnt`)).toBe(false);
}

/** A fresh directory per daemon with the same names in each (outputs compare as they are). */
function daemonDir(which: Which): string {
  const dir = scratch.path(which);
  mkdirSync(dir);
  writeFileSync(`${dir}/mnt`, '');
  return dir;
}

const rawArgs = (dir: string, exportOpts: string) => [
  '--blockdev',
  `driver=file,node-name=f,filename=${dir}/disk.raw,discard=unmap`,
  '--blockdev',
  'driver=raw,node-name=r,file=f,discard=unmap',
  '--export',
  `type=fuse,id=e,node-name=r,mountpoint=${dir}/mnt,${exportOpts}`,
];

describe('FUSE export, side by side with qemu-storage-daemon', () => {
  it('serves a qcow2 node as a raw file: qemu-img info, qemu-io, fsync, cmp with qemu-img convert', async () => {
    const seen: Record<Which, unknown[]> = { qsd: [], 'vm-disk': [] };
    for (const which of ['qsd', 'vm-disk'] as const) {
      const dir = daemonDir(which);
      const out = seen[which];
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', `${dir}/disk.qcow2`, '8M']);
      await run('qemu-io', [
        '-c',
        'write -P 0x11 0 1M',
        '-c',
        'write -P 0x22 5M 64k',
        `${dir}/disk.qcow2`,
      ]);
      const p = await startDaemon(which, dir, [
        '--blockdev',
        `driver=file,node-name=f,filename=${dir}/disk.qcow2`,
        '--blockdev',
        'driver=qcow2,node-name=q,file=f',
        '--export',
        `type=fuse,id=e,node-name=q,mountpoint=${dir}/mnt,writable=on`,
      ]);
      out.push(await sh(dir, 'stat', ['-c', '%s %a %F %h', 'mnt']));
      const info = JSON.parse(await run('qemu-img', ['info', '--output=json', `${dir}/mnt`]));
      out.push(info.format, info['virtual-size']);
      out.push(
        await sh(dir, 'qemu-io', [
          '-f',
          'raw',
          '-c',
          'write -P 0x33 4096 200k',
          '-c',
          'read -P 0x33 4096 200k',
          '-c',
          'read -P 0x22 5M 64k',
          '-c',
          'write -z 6M 1M',
          '-c',
          'read -P 0 6M 1M',
          'mnt',
        ]),
      );
      const fd = openSync(`${dir}/mnt`, 'r+');
      fsyncSync(fd);
      closeSync(fd);
      const converted = `${dir}/converted.raw`;
      await run('qemu-img', ['convert', '-U', '-O', 'raw', `${dir}/disk.qcow2`, converted]);
      out.push(await sh(dir, 'cmp', ['mnt', 'converted.raw']));
      await stopDaemon(p, dir);
      out.push(await sh(dir, 'qemu-img', ['check', 'disk.qcow2']));
    }
    expect(seen['vm-disk']).toEqual(seen.qsd);
    expect(seen.qsd.at(-2)).toBe('0 ');
  });

  for (const opts of ['writable=on,growable=off', 'writable=on,growable=on', 'writable=off']) {
    it(`fallocate, truncate, writes past the end, chmod, as qemu-storage-daemon (${opts})`, async () => {
      const seen: Record<Which, unknown[]> = { qsd: [], 'vm-disk': [] };
      for (const which of ['qsd', 'vm-disk'] as const) {
        const dir = daemonDir(which);
        const out = seen[which];
        await run('qemu-img', ['create', '-q', '-f', 'raw', `${dir}/disk.raw`, '4M']);
        await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 2M', `${dir}/disk.raw`]);
        const p = await startDaemon(which, dir, rawArgs(dir, opts));
        const step = async (cmd: string, args: string[]) => {
          out.push(`${cmd} ${args.join(' ')}: ${await sh(dir, cmd, args)}`);
          out.push(await sh(dir, 'stat', ['-c', '%s %a', 'mnt']));
        };
        await step('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 3M 64k', 'mnt']);
        await step('fallocate', ['-p', '-o', '0', '-l', '128k', 'mnt']);
        await step('fallocate', ['-z', '-o', '256k', '-l', '64k', 'mnt']);
        await step('fallocate', ['-z', '-o', '4092k', '-l', '64k', 'mnt']);
        await step('fallocate', ['-o', '0', '-l', '64k', 'mnt']);
        await step('fallocate', ['-o', '5M', '-l', '64k', 'mnt']);
        await step('truncate', ['-s', '6M', 'mnt']);
        await step('dd', [
          'if=/dev/zero',
          'of=mnt',
          'bs=4k',
          'seek=2000',
          'count=1',
          'conv=notrunc',
          'status=none',
        ]);
        await step('chmod', ['0644', 'mnt']);
        await step('chmod', ['0600', 'mnt']);
        const map = JSON.parse(await run('qemu-img', ['map', '--output=json', `${dir}/disk.raw`]));
        // The punched hole and the zeroed range are holes in the image itself.
        if (opts.startsWith('writable=on')) {
          for (const [start, length] of [
            [0, 131072],
            [262144, 65536],
          ]) {
            expect(map).toContainEqual(
              expect.objectContaining({ start, length, zero: true, data: false }),
            );
          }
        }
        out.push(map);
        out.push(readFileSync(`${dir}/mnt`).equals(readFileSync(`${dir}/disk.raw`)));
        await stopDaemon(p, dir);
      }
      expect(seen['vm-disk']).toEqual(seen.qsd);
    });
  }
});

/** A message as compared: without its timestamp, the scratch directory taken out. */
function bare(m: QmpMessage, dir: string): unknown {
  const { timestamp: _, ...rest } = m;
  return JSON.parse(JSON.stringify(rest).replaceAll(dir, '.'));
}

describe('FUSE export lifecycle', () => {
  it('block-export-add and -del, and bad mount points, as qemu-storage-daemon; the daemon keeps serving', async () => {
    const seen: Record<Which, unknown[]> = { qsd: [], 'vm-disk': [] };
    for (const which of ['qsd', 'vm-disk'] as const) {
      const dir = daemonDir(which);
      const out = seen[which];
      mkdirSync(`${dir}/adir`);
      await run('qemu-img', ['create', '-q', '-f', 'raw', `${dir}/disk.raw`, '1M']);
      const p = await startDaemon(which, dir, [
        '--blockdev',
        `driver=file,node-name=f,filename=${dir}/disk.raw`,
      ]);
      const { client } = await QmpTestClient.connect(`${dir}/qmp.sock`);
      const qmp = async (execute: string, args?: Record<string, unknown>, messages = 1) => {
        client.sendRaw(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
        for (let i = 0; i < messages; i++) out.push(bare(await client.next(), dir));
      };
      const add = (id: string, mountpoint: string) =>
        qmp('block-export-add', { type: 'fuse', id, 'node-name': 'f', mountpoint, writable: true });
      await qmp('qmp_capabilities');
      await add('e0', `${dir}/missing`);
      await add('e0', `${dir}/adir`);
      await add('e0', `${dir}/mnt`);
      out.push(mounted(`${dir}/mnt`));
      await add('e1', `${dir}/mnt`);
      await add('e0', `${dir}/mnt2`);
      await qmp('query-block-exports');
      // Still serving: the file reads and writes.
      out.push(
        await sh(dir, 'qemu-io', [
          '-f',
          'raw',
          '-c',
          'write -P 7 0 4k',
          '-c',
          'read -P 7 0 4k',
          'mnt',
        ]),
      );
      await qmp('block-export-del', { id: 'e0' }, 2);
      out.push(mounted(`${dir}/mnt`));
      await qmp('query-block-exports');
      await qmp('block-export-del', { id: 'e0' });
      // The same mount point again, then quit: the export goes before the reply.
      await add('e2', `${dir}/mnt`);
      out.push(mounted(`${dir}/mnt`));
      await qmp('quit', undefined, 2);
      client.close();
      expect(await p.exited).toBe(0);
      out.push(mounted(`${dir}/mnt`));
    }
    expect(seen['vm-disk']).toEqual(seen.qsd);
  });

  it('unmounts on SIGTERM; after kill -9 no stale mount stays (qemu-storage-daemon leaves one)', async () => {
    for (const which of ['qsd', 'vm-disk'] as const) {
      const dir = daemonDir(which);
      await run('qemu-img', ['create', '-q', '-f', 'raw', `${dir}/disk.raw`, '1M']);
      const args = rawArgs(dir, 'writable=on');
      await stopDaemon(await startDaemon(which, dir, args), dir);
      const p = await startDaemon(which, dir, args);
      expect(await p.stop('SIGKILL')).toBe('SIGKILL');
      if (which === 'qsd') {
        // The connection is gone with the process, the mount stays: ENOTCONN.
        expect(mounted(`${dir}/mnt`)).toBe(true);
        expect(await sh(dir, 'stat', ['-c', '%s', 'mnt'])).toMatch(/not connected/);
        await run('umount', ['-l', `${dir}/mnt`]);
      } else {
        // vm-disk's watchdog saw its pipe close and detached the mount.
        await waitFor('the stale mount to go', () => !mounted(`${dir}/mnt`));
        expect(await sh(dir, 'stat', ['-c', '%s', 'mnt'])).toBe('0 0');
      }
    }
  });
});
