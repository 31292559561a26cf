// Images whose backing chain loops: `serve` fails at once with a clear error, QMP
// blockdev-add answers an error and the daemon keeps serving, and `create` refuses to make an
// image its own backing file, as qemu-img does.
import { existsSync, readdirSync, readFileSync, symlinkSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, monitorArgs, run, start, startServe, useScratch } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-loop-');
const { running } = scratch;

/** A 1 MiB qcow2 image whose header names `backing` (nothing is checked: qemu-img -u). */
async function qcow2(name: string, backing?: string): Promise<string> {
  const path = scratch.path(name);
  const b = backing === undefined ? [] : ['-u', '-b', backing, '-F', 'qcow2'];
  await run('qemu-img', ['create', '-f', 'qcow2', ...b, path, '1M']);
  return path;
}

async function rebase(path: string, backing: string): Promise<void> {
  await run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', path]);
}

const blockdev = (name: string, path: string) =>
  JSON.stringify({ driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: path } });

describe('backing chains that loop', () => {
  it('serve exits at once with an error naming the file, leaving nothing behind', {
    timeout: 30_000,
  }, async () => {
    const self = await qcow2('self.qcow2');
    await rebase(self, 'self.qcow2');
    const sock = scratch.path('nbd.sock');
    const p = start(process.execPath, [
      CLI,
      'serve',
      '--blockdev',
      blockdev('d0', self),
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
    ]);
    running.push(p);
    expect(await p.exited).toBe(1);
    expect(p.stderr()).toContain(`Backing file '${self}' creates an infinite loop`);
    expect(p.stderr()).toContain('ERR_VMDISK_BLOCK_BACKING_LOOP');
    expect(existsSync(sock)).toBe(false);
  });

  it('QMP blockdev-add answers an error, leaks nothing, and the daemon keeps serving', {
    timeout: 30_000,
  }, async () => {
    const a = await qcow2('a.qcow2');
    const b = await qcow2('b.qcow2', 'a.qcow2');
    await rebase(a, 'b.qcow2');
    const good = await qcow2('good.qcow2');
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 0 64k', good]);
    const qmpSock = scratch.path('qmp.sock');
    const nbdSock = scratch.path('nbd.sock');
    const p = await startServe([
      ...monitorArgs(qmpSock),
      '--nbd-server',
      `addr.type=unix,addr.path=${nbdSock}`,
    ]);
    running.push(p);
    const fds = () => readdirSync(`/proc/${p.child.pid}/fd`).length;
    const { client } = await QmpTestClient.connect(qmpSock);
    try {
      expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
      // The I/O engine keeps its descriptors once used: count after a first use.
      const add = (name: string, path: string) =>
        client.execute({ execute: 'blockdev-add', arguments: JSON.parse(blockdev(name, path)) });
      expect(await add('w', good)).toEqual({ return: {} });
      expect(
        await client.execute({ execute: 'blockdev-del', arguments: { 'node-name': 'w' } }),
      ).toEqual({ return: {} });
      const before = fds();
      for (const [name, path, looping] of [
        ['la', a, a],
        ['lb', b, b],
      ] as const) {
        expect(await add(name, path)).toMatchObject({
          error: {
            class: 'GenericError',
            desc: `Backing file '${looping}' creates an infinite loop`,
          },
        });
      }
      expect(fds()).toBe(before);
      expect((await client.execute({ execute: 'query-named-block-nodes' })).return).toEqual([]);
      // Still serving: a good image is added, exported and read.
      expect(await add('d0', good)).toEqual({ return: {} });
      expect(
        await client.execute({
          execute: 'block-export-add',
          arguments: { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'disk' },
        }),
      ).toEqual({ return: {} });
      await run('qemu-io', [
        '-r',
        '-f',
        'raw',
        '-c',
        'read -P 0x3c 0 64k',
        `nbd+unix:///disk?socket=${nbdSock}`,
      ]);
      expect(await client.execute({ execute: 'quit' })).toEqual({ return: {} });
    } finally {
      client.close();
    }
    expect(await p.exited).toBe(0);
  });
});

describe('vm-disk create with itself as the backing file', () => {
  const message = 'Error: Trying to create an image with the same filename as the backing file';

  it('is refused as qemu-img refuses it (status 1), leaving no file behind', async () => {
    const path = scratch.path('self.qcow2');
    for (const size of [['1M'], []]) {
      const theirs = start('qemu-img', [
        'create',
        '-f',
        'qcow2',
        '-b',
        path,
        '-F',
        'qcow2',
        path,
        ...size,
      ]);
      expect(await theirs.exited).toBe(1);
      expect(theirs.stderr()).toContain(message);
      const ours = start(process.execPath, [
        CLI,
        'create',
        '-f',
        'qcow2',
        '-b',
        'self.qcow2',
        '-F',
        'qcow2',
        path,
        ...size,
      ]);
      expect(await ours.exited).toBe(1);
      expect(ours.stderr()).toContain(`${path}: ${message}`);
      expect(existsSync(path)).toBe(false);
    }
  });

  it('is refused under any name of the file (./, absolute, symlink), leaving an existing image as it was', async () => {
    const path = await qcow2('image.qcow2');
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 64k', path]);
    symlinkSync('image.qcow2', scratch.path('link.qcow2'));
    const before = readFileSync(path);
    for (const backing of [
      'image.qcow2',
      './image.qcow2',
      path,
      'link.qcow2',
      `${scratch.dir}/../${scratch.dir.split('/').at(-1)}/image.qcow2`,
    ]) {
      const p = start(process.execPath, [
        CLI,
        'create',
        '-f',
        'qcow2',
        '-b',
        backing,
        '-F',
        'qcow2',
        path,
        '1M',
      ]);
      expect(await p.exited, backing).toBe(1);
      expect(p.stderr()).toContain(message);
      expect(readFileSync(path).equals(before)).toBe(true);
    }
  });
});
