// Proves the container harness: a kernel filesystem on a loop device in a privileged
// container, written, read back, unmounted and checked clean; the container is removed.
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { CommandFailed, withPrivilegedContainer } from '../harness/container.ts';

function containerExists(id: string): boolean {
  try {
    execFileSync('docker', ['inspect', id], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('privileged container harness', () => {
  it('runs ext4 on a loop device: mkfs, mount, write, read back, unmount, e2fsck clean', async () => {
    let id = '';
    await withPrivilegedContainer(async (c) => {
      id = c.id;
      await c.run('truncate -s 64M /tmp/disk.img');
      const loop = (await c.run('losetup -f --show /tmp/disk.img')).trim();
      expect(loop).toMatch(/^\/dev\/loop\d+$/);
      try {
        await c.run(`mkfs.ext4 -q -F ${loop}`);
        await c.run(`mkdir -p /mnt/t && mount ${loop} /mnt/t`);
        await c.run(
          'head -c 1048576 /dev/urandom > /mnt/t/data && sha256sum /mnt/t/data > /tmp/sum',
        );
        await c.run('umount /mnt/t');
        await c.run(`mount -o ro ${loop} /mnt/t && sha256sum -c /tmp/sum && umount /mnt/t`);
        const fsck = await c.exec(`e2fsck -fn ${loop}`);
        expect(fsck.stdout + fsck.stderr).toMatch(/12\/\d+ files/);
        expect(fsck.exitCode).toBe(0);
      } finally {
        await c.exec(`umount /mnt/t 2>/dev/null; losetup -d ${loop}`);
      }
    });
    expect(id).not.toBe('');
    expect(containerExists(id)).toBe(false);
  });

  it('reports a failing command with its exit status and output, and still removes the container', async () => {
    let id = '';
    const failure = await withPrivilegedContainer(async (c) => {
      id = c.id;
      await c.run('echo to-stderr >&2; exit 3');
    }).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(CommandFailed);
    expect((failure as CommandFailed).result.exitCode).toBe(3);
    expect((failure as CommandFailed).message).toContain('to-stderr');
    expect(containerExists(id)).toBe(false);
  });
});
