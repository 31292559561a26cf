// The vm-disk container image, end to end in a privileged container: vm-disk serves a disk
// image over NBD; nbdfuse turns the export into a file; a loop device on it carries a
// real ext4 filesystem, written, read back, unmounted and checked clean; vm-disk stops
// cleanly on SIGTERM.
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { BASE_IMAGE, withPrivilegedContainer } from '../harness/container.ts';

const TAG = 'vm-disk:test';

beforeAll(() => {
  const script = fileURLToPath(new URL('../../scripts/build-image.mjs', import.meta.url));
  execFileSync(process.execPath, [script, '--base', BASE_IMAGE, '--tag', TAG], {
    stdio: 'inherit',
  });
}, 120_000);

describe('the vm-disk image', () => {
  it('serves a raw image that carries an ext4 filesystem through nbdfuse and a loop device', async () => {
    await withPrivilegedContainer(
      async (c) => {
        expect((await c.run('vm-disk --version')).trim()).toMatch(/^vm-disk \d+\.\d+\.\d+$/);
        await c.run('mkdir -p /run/t /run/fuse && truncate -s 128M /run/t/disk.raw');
        await c.run(
          'VMDISK_LOG_FORMAT=json vm-disk serve' +
            ` --blockdev '{"driver":"file","node-name":"f0","filename":"/run/t/disk.raw"}'` +
            ` --blockdev '{"driver":"raw","node-name":"d0","file":"f0"}'` +
            ' --nbd-server addr.type=unix,addr.path=/run/t/nbd.sock' +
            ' --export type=nbd,id=e0,node-name=d0,name=disk,writable=on' +
            ' --pidfile /run/t/vm-disk.pid > /run/t/serve.log 2>&1 &',
        );
        await c.run(
          'for i in $(seq 100); do [ -S /run/t/nbd.sock ] && exit 0; sleep 0.1; done; cat /run/t/serve.log; exit 1',
        );
        await c.run(
          "nbdfuse /run/fuse/disk 'nbd+unix:///disk?socket=/run/t/nbd.sock' > /run/t/fuse.log 2>&1 &",
        );
        await c.run(
          'for i in $(seq 100); do [ -f /run/fuse/disk ] && exit 0; sleep 0.1; done; cat /run/t/fuse.log; exit 1',
        );
        const loop = (await c.run('losetup -f --show /run/fuse/disk')).trim();
        try {
          await c.run(`mkfs.ext4 -q -F ${loop} && mkdir -p /mnt/d && mount ${loop} /mnt/d`);
          await c.run(
            'head -c 8M /dev/urandom > /mnt/d/data && sha256sum /mnt/d/data > /run/t/sum && sync',
          );
          await c.run(
            `umount /mnt/d && mount -o ro ${loop} /mnt/d && sha256sum -c /run/t/sum && umount /mnt/d`,
          );
          const fsck = await c.exec(`e2fsck -fn ${loop}`);
          expect(fsck.exitCode, fsck.stdout + fsck.stderr).toBe(0);
        } finally {
          await c.exec(`umount /mnt/d 2>/dev/null; losetup -d ${loop}; fusermount3 -u /run/fuse`);
        }
        await c.run(
          'kill -TERM $(cat /run/t/vm-disk.pid); for i in $(seq 100); do [ -f /run/t/vm-disk.pid ] || exit 0; sleep 0.1; done; exit 1',
        );
        const log = await c.run('cat /run/t/serve.log');
        expect(log).toContain('"event":"stopped"');
        // The filesystem reached the image file itself, not just vm-disk's memory.
        const direct = await c.exec('e2fsck -fn /run/t/disk.raw');
        expect(direct.exitCode, direct.stdout + direct.stderr).toBe(0);
      },
      { image: TAG },
    );
  });
});
