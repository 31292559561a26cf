// The end-to-end tests of vm-disk in privileged, host-network containers (issue 8): the
// vm-disk image serves in one container; a second container (or the host, for QMP) is the
// client. A host directory is bind-mounted at /run/t into both, so images, sockets, logs
// and the pidfile are shared, and the host's qemu-img judges the images afterwards.
//  1. ext4 on a qcow2 export (nbdfuse + loop device): hundreds of files and a large one,
//     e2fsck clean, checksums after a remount; vm-disk stops on SIGTERM; qemu-img check
//     clean; and the filesystem is in the qcow2 itself (converted by qemu-img, checked).
//  2. qemu-io and qemu-img against it: patterns, zero writes, map, convert and compare.
//  3. QMP from the host: blockdev-add, block-export-add, nbdinfo, block-export-del and its
//     BLOCK_EXPORT_DELETED event, blockdev-del; blockdev-create jobs; quit.
//  4. The vm-disk container SIGKILLed while a writer writes and flushes: no corruption, and
//     every round whose flush completed reads back.
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { type PrivilegedContainer, withPrivilegedContainer } from '../harness/container.ts';
import { buildVmDiskImage } from '../harness/image.ts';
import { type QmpMessage, QmpTestClient } from '../harness/qmp-client.ts';

const TAG = 'vm-disk:e2e';
const T = '/run/t'; // the shared host directory, as the containers see it
const execFileP = promisify(execFile);

beforeAll(() => {
  buildVmDiskImage(TAG);
}, 120_000);

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function sharedDir(): { host: string; binds: { source: string; target: string }[] } {
  const host = mkdtempSync(join(tmpdir(), 'vmdisk-e2e-'));
  dirs.push(host);
  return { host, binds: [{ source: host, target: T }] };
}

/** A TCP port free on the host now (containers share the host's network). */
async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Runs a host command; resolves with its exit code and output, whatever the code. */
async function host(
  command: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(command, args, { maxBuffer: 64 << 20 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code?: number; stdout?: string; stderr?: string };
    return {
      code: typeof err.code === 'number' ? err.code : -1,
      stdout: err.stdout ?? '',
      stderr: err.stderr ?? String(e),
    };
  }
}

/** Polls a shell condition in a container (every 0.1 s, up to `tries`); fails with `onFail`'s output. */
async function waitIn(
  c: PrivilegedContainer,
  condition: string,
  onFail = 'true',
  tries = 300,
): Promise<void> {
  await c.run(
    `for i in $(seq ${tries}); do if ${condition}; then exit 0; fi; sleep 0.1; done; ${onFail}; exit 1`,
  );
}

/** Starts `vm-disk serve ARGS` in the background in `c`, logging to /run/t/serve.log. */
async function serveIn(c: PrivilegedContainer, args: string): Promise<void> {
  await c.run(
    `VMDISK_LOG_FORMAT=json vm-disk serve ${args} --pidfile ${T}/vm-disk.pid > ${T}/serve.log 2>&1 &`,
  );
  await waitIn(c, `grep -q '"event":"ready"' ${T}/serve.log`, `cat ${T}/serve.log`);
}

/** SIGTERMs vm-disk in `c`, waits for it to remove its pidfile, and returns its log. */
async function stopServe(c: PrivilegedContainer): Promise<string> {
  await c.run(`kill -TERM $(cat ${T}/vm-disk.pid)`);
  await waitIn(c, `[ ! -f ${T}/vm-disk.pid ]`, `cat ${T}/serve.log`);
  return c.run(`cat ${T}/serve.log`);
}

function serveArgs(image: string, format: string, nbdAddr: string): string {
  return (
    ` --blockdev driver=file,node-name=f0,filename=${image}` +
    ` --blockdev driver=${format},node-name=d0,file=f0` +
    ` --nbd-server ${nbdAddr}` +
    ' --export type=nbd,id=e0,node-name=d0,name=disk,writable=on'
  );
}

/** `qemu-img check --output=json` on the host; its exit code and parsed report. */
async function qemuImgCheck(file: string): Promise<{ code: number; report: QemuImgCheck }> {
  const r = await host('qemu-img', ['check', '-f', 'qcow2', '--output=json', file]);
  expect(r.stdout, r.stderr).toContain('{');
  return { code: r.code, report: JSON.parse(r.stdout) as QemuImgCheck };
}

interface QemuImgCheck {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'image-end-offset'?: number;
}

describe('vm-disk end to end in privileged containers', () => {
  it('carries ext4 on a qcow2 export: 300 files and 32 MiB, e2fsck clean, checksums after remount; stops clean', async () => {
    const { host: dir, binds } = sharedDir();
    const port = await freePort();
    await withPrivilegedContainer(
      async (server) => {
        await server.run(`vm-disk create -f qcow2 ${T}/disk.qcow2 512M`);
        await serveIn(
          server,
          serveArgs(
            `${T}/disk.qcow2`,
            'qcow2',
            `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
          ),
        );
        await withPrivilegedContainer(
          async (client) => {
            await client.run(
              `mkdir -p /run/fuse /var/tmp/b && nbdfuse /run/fuse/disk nbd://127.0.0.1:${port}/disk > /var/tmp/b/fuse.log 2>&1 &`,
            );
            await waitIn(client, '[ -f /run/fuse/disk ]', 'cat /var/tmp/b/fuse.log');
            const loop = (await client.run('losetup -f --show /run/fuse/disk')).trim();
            expect(loop).toMatch(/^\/dev\/loop\d+$/);
            try {
              await client.run(
                `mkfs.ext4 -q -F ${loop} && mkdir -p /mnt/d && mount ${loop} /mnt/d`,
              );
              await client.run(
                'mkdir /mnt/d/small && i=1 && while [ $i -le 300 ]; do' +
                  ' head -c $((i * 97 + 1)) /dev/urandom > /mnt/d/small/f$i; i=$((i + 1)); done' +
                  ' && head -c 32M /dev/urandom > /mnt/d/large' +
                  ' && cd /mnt/d && find small large -type f | sort | xargs sha256sum > /var/tmp/b/sums',
              );
              expect((await client.run('wc -l < /var/tmp/b/sums')).trim()).toBe('301');
              await client.run('umount /mnt/d');
              const fsck = await client.exec(`e2fsck -fn ${loop}`);
              expect(fsck.exitCode, fsck.stdout + fsck.stderr).toBe(0);
              // 11 reserved inodes (lost+found is the 11th), the folder, 300 files and the large one.
              expect(fsck.stdout + fsck.stderr).toMatch(/ 313\/\d+ files/);
              await client.run(
                `mount -o ro ${loop} /mnt/d && cd /mnt/d && sha256sum -c --quiet /var/tmp/b/sums && cd / && umount /mnt/d`,
              );
            } finally {
              await client.exec(
                `umount /mnt/d 2>/dev/null; losetup -d ${loop}; fusermount3 -u /run/fuse`,
              );
            }
            const log = await stopServe(server);
            expect(log).toContain('"event":"nbd-connect"');
            expect(log).toContain('"event":"stopped"');

            // The filesystem is in the qcow2 file as QEMU reads it: converted to raw by
            // qemu-img, checked and mounted, the checksums hold.
            await client.run(
              `qemu-img convert -f qcow2 -O raw ${T}/disk.qcow2 /var/tmp/b/disk.raw`,
            );
            const direct = await client.exec('e2fsck -fn /var/tmp/b/disk.raw');
            expect(direct.exitCode, direct.stdout + direct.stderr).toBe(0);
            const raw = (await client.run('losetup -f --show -r /var/tmp/b/disk.raw')).trim();
            try {
              await client.run(
                `mount -o ro ${raw} /mnt/d && cd /mnt/d && sha256sum -c --quiet /var/tmp/b/sums && cd / && umount /mnt/d`,
              );
            } finally {
              await client.exec(`umount /mnt/d 2>/dev/null; losetup -d ${raw}`);
            }
          },
          { binds },
        );
      },
      { image: TAG, binds },
    );
    const { code, report } = await qemuImgCheck(join(dir, 'disk.qcow2'));
    expect(code, JSON.stringify(report)).toBe(0);
    expect(report['check-errors']).toBe(0);
    expect(report.leaks ?? 0).toBe(0);
    expect(report.corruptions ?? 0).toBe(0);
    // More than the 32 MiB file reached the image.
    expect(report['image-end-offset']).toBeGreaterThan(32 << 20);
  }, 120_000);

  it('answers qemu-io and qemu-img: patterns, zero writes, map, convert and compare', async () => {
    const { host: dir, binds } = sharedDir();
    const uri = `'nbd+unix:///disk?socket=${T}/nbd.sock'`;
    const M = 1 << 20;
    await withPrivilegedContainer(
      async (server) => {
        await server.run(`vm-disk create -f qcow2 ${T}/disk.qcow2 64M`);
        await serveIn(
          server,
          serveArgs(`${T}/disk.qcow2`, 'qcow2', `addr.type=unix,addr.path=${T}/nbd.sock`),
        );
        await withPrivilegedContainer(
          async (client) => {
            await client.run(
              `qemu-io -f raw -c 'write -P 0xab 0 ${M}' -c 'write -P 0xcd ${M} 65536'` +
                ` -c 'write -P 0x11 ${3 * M} ${M}' -c 'write -z ${3 * M} ${M / 2}'` +
                ` -c 'write -P 0x22 5000 3000' -c flush ${uri}`,
            );
            // Read back by a second qemu-io, read-only: every region has what was written.
            const reads = await client.exec(
              `qemu-io -r -f raw -c 'read -P 0xab 0 5000' -c 'read -P 0x22 5000 3000'` +
                ` -c 'read -P 0xab 8000 ${M - 8000}' -c 'read -P 0xcd ${M} 65536'` +
                ` -c 'read -P 0 ${M + 65536} ${2 * M - 65536}' -c 'read -P 0 ${3 * M} ${M / 2}'` +
                ` -c 'read -P 0x11 ${3.5 * M} ${M / 2}' -c 'read -P 0 ${4 * M} ${60 * M}' ${uri}`,
            );
            expect(reads.exitCode, reads.stdout + reads.stderr).toBe(0);
            expect(reads.stdout).not.toContain('Pattern verification failed');
            expect(reads.stdout.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(8);
            // The same check fails where the data differs (the zeroed half of 0x11).
            const wrong = await client.exec(
              `qemu-io -r -f raw -c 'read -P 0x11 ${3 * M} 4096' ${uri}`,
            );
            expect(wrong.exitCode).not.toBe(0);
            expect(wrong.stdout + wrong.stderr).toContain('Pattern verification failed');

            // Block status: the zero-written range reads as zeroes, the patterned ones as data.
            const map = JSON.parse(
              await client.run(`qemu-img map -f raw --output=json ${uri}`),
            ) as { start: number; length: number; data: boolean; zero: boolean }[];
            const at = (offset: number) =>
              map.find((e) => e.start <= offset && offset < e.start + e.length);
            expect(at(0)).toMatchObject({ data: true, zero: false });
            expect(at(3.5 * M)).toMatchObject({ data: true, zero: false });
            expect(at(3 * M)?.zero).toBe(true);
            expect(at(32 * M)?.zero).toBe(true);

            // convert the export to a local qcow2; compare says identical, then different.
            await client.run(`qemu-img convert -f raw -O qcow2 ${uri} ${T}/copy.qcow2`);
            const same = await client.exec(
              `qemu-img compare -f raw -F qcow2 ${uri} ${T}/copy.qcow2`,
            );
            expect(same.exitCode, same.stdout + same.stderr).toBe(0);
            await client.run(`qemu-io -f raw -c 'write -P 0x33 ${10 * M} 4096' ${uri}`);
            const differ = await client.exec(
              `qemu-img compare -f raw -F qcow2 ${uri} ${T}/copy.qcow2`,
            );
            expect(differ.exitCode).toBe(1);
            expect(differ.stdout).toContain(`Content mismatch at offset ${10 * M}`);
          },
          { binds },
        );
        expect(await stopServe(server)).toContain('"event":"stopped"');
      },
      { image: TAG, binds },
    );
    // The served qcow2 is clean, and (but for the last write) what was converted from it.
    const { code, report } = await qemuImgCheck(join(dir, 'disk.qcow2'));
    expect(code, JSON.stringify(report)).toBe(0);
    const served = await host('qemu-io', [
      '-r',
      '-f',
      'qcow2',
      '-c',
      `read -P 0x33 ${10 * M} 4096`,
      join(dir, 'disk.qcow2'),
    ]);
    expect(served.code, served.stdout + served.stderr).toBe(0);
    const rest = await host('qemu-img', [
      'compare',
      '-f',
      'qcow2',
      '-F',
      'qcow2',
      join(dir, 'disk.qcow2'),
      join(dir, 'copy.qcow2'),
    ]);
    expect(rest.stdout).toContain(`Content mismatch at offset ${10 * M}`);
  }, 90_000);

  it('is driven over QMP: blockdev-add, block-export-add, nbdinfo, block-export-del with its event, blockdev-del, blockdev-create', async () => {
    const { host: dir, binds } = sharedDir();
    await withPrivilegedContainer(
      async (server) => {
        await server.run(
          `vm-disk create -f qcow2 ${T}/new.qcow2 64M && qemu-io -f qcow2 -c 'write -P 0x5a 0 2M' ${T}/new.qcow2`,
        );
        await serveIn(
          server,
          `--chardev socket,id=m0,path=${T}/qmp.sock,server=on,wait=off --monitor chardev=m0`,
        );
        const { client, greeting } = await QmpTestClient.connect(join(dir, 'qmp.sock'));
        const qmp = new Qmp(client);
        try {
          expect(greeting).toHaveProperty('QMP.version.qemu.major');
          expect(await qmp.exec('qmp_capabilities')).toEqual({ return: {} });
          expect(
            await qmp.exec('nbd-server-start', {
              addr: { type: 'unix', data: { path: `${T}/nbd.sock` } },
            }),
          ).toEqual({ return: {} });
          const uri = (name: string) => `nbd+unix:///${name}?socket=${join(dir, 'nbd.sock')}`;

          // An image made by `vm-disk create` (and written by qemu-io) joins the graph.
          expect(
            await qmp.exec('blockdev-add', {
              driver: 'qcow2',
              'node-name': 'n1',
              file: { driver: 'file', filename: `${T}/new.qcow2` },
            }),
          ).toEqual({ return: {} });
          expect(await qmp.nodeNames()).toContain('n1');
          expect(
            await qmp.exec('block-export-add', {
              type: 'nbd',
              id: 'x1',
              'node-name': 'n1',
              name: 'new',
              writable: false,
            }),
          ).toEqual({ return: {} });
          expect((await qmp.exec('query-block-exports')).return).toEqual([
            expect.objectContaining({ type: 'nbd', id: 'x1', 'node-name': 'n1' }),
          ]);

          const info = await host('nbdinfo', ['--json', uri('new')]);
          expect(info.code, info.stderr).toBe(0);
          const exp = (JSON.parse(info.stdout) as { exports: Record<string, unknown>[] })
            .exports[0];
          expect(exp).toMatchObject({
            'export-name': 'new',
            'export-size': 64 << 20,
            is_read_only: true,
          });
          const map = await host('nbdinfo', ['--map', '--totals', uri('new')]);
          expect(map.code, map.stderr).toBe(0);
          // 2 MiB of data, the rest holes that read as zeroes.
          expect(map.stdout).toMatch(/^\s*2097152\s+3\.1%\s+0\s+data$/m);
          const read = await host('qemu-io', [
            '-r',
            '-f',
            'raw',
            '-c',
            'read -P 0x5a 0 2M',
            '-c',
            'read -P 0 2M 62M',
            uri('new'),
          ]);
          expect(read.code, read.stdout + read.stderr).toBe(0);

          // block-export-del: replied to, then BLOCK_EXPORT_DELETED; the export is gone.
          expect(await qmp.exec('block-export-del', { id: 'x1' })).toEqual({ return: {} });
          const deleted = await qmp.event('BLOCK_EXPORT_DELETED');
          expect(deleted.data).toEqual({ id: 'x1' });
          expect(deleted).toHaveProperty('timestamp.seconds');
          expect((await qmp.exec('query-block-exports')).return).toEqual([]);
          expect((await host('nbdinfo', ['--json', uri('new')])).code).not.toBe(0);
          expect(await qmp.exec('blockdev-del', { 'node-name': 'n1' })).toEqual({ return: {} });
          expect(await qmp.nodeNames()).not.toContain('n1');
          const again = await qmp.exec('blockdev-del', { 'node-name': 'n1' });
          expect(again).toHaveProperty('error.class', 'GenericError');

          // blockdev-create, QEMU's way: a file, its node, a qcow2 on it, then the qcow2 node.
          await qmp.createJob('c1', {
            driver: 'file',
            filename: `${T}/made.qcow2`,
            size: 0,
          });
          await qmp.exec('blockdev-add', {
            driver: 'file',
            'node-name': 'mf',
            filename: `${T}/made.qcow2`,
          });
          await qmp.createJob('c2', { driver: 'qcow2', file: 'mf', size: 32 << 20 });
          expect(
            await qmp.exec('blockdev-add', { driver: 'qcow2', 'node-name': 'md', file: 'mf' }),
          ).toEqual({ return: {} });
          expect(
            await qmp.exec('block-export-add', {
              type: 'nbd',
              id: 'x2',
              'node-name': 'md',
              name: 'made',
              writable: true,
            }),
          ).toEqual({ return: {} });
          const rw = await host('qemu-io', [
            '-f',
            'raw',
            '-c',
            'write -P 0x77 1M 1M',
            '-c',
            'read -P 0x77 1M 1M',
            '-c',
            'read -P 0 0 1M',
            uri('made'),
          ]);
          expect(rw.code, rw.stdout + rw.stderr).toBe(0);
          expect(await qmp.exec('block-export-del', { id: 'x2' })).toEqual({ return: {} });
          expect((await qmp.event('BLOCK_EXPORT_DELETED')).data).toEqual({ id: 'x2' });
          expect(await qmp.exec('blockdev-del', { 'node-name': 'md' })).toEqual({ return: {} });
          expect(await qmp.exec('blockdev-del', { 'node-name': 'mf' })).toEqual({ return: {} });
          expect(await qmp.nodeNames()).toEqual([]);

          expect(await qmp.exec('quit')).toEqual({ return: {} });
        } finally {
          client.close();
        }
        await waitIn(server, `[ ! -f ${T}/vm-disk.pid ]`, `cat ${T}/serve.log`);
        expect(await server.run(`cat ${T}/serve.log`)).toContain('"event":"stopped"');
      },
      { image: TAG, binds },
    );
    for (const image of ['new.qcow2', 'made.qcow2']) {
      const { code, report } = await qemuImgCheck(join(dir, image));
      expect(code, `${image}: ${JSON.stringify(report)}`).toBe(0);
    }
    const made = await host('qemu-io', [
      '-r',
      '-f',
      'qcow2',
      '-c',
      'read -P 0x77 1M 1M',
      join(dir, 'made.qcow2'),
    ]);
    expect(made.code, made.stdout + made.stderr).toBe(0);
    const madeInfo = JSON.parse(
      (await host('qemu-img', ['info', '--output=json', join(dir, 'made.qcow2')])).stdout,
    ) as { format: string; 'virtual-size': number };
    expect(madeInfo).toMatchObject({ format: 'qcow2', 'virtual-size': 32 << 20 });
  }, 90_000);

  it('loses no flushed write and corrupts nothing when its container is SIGKILLed mid-write', async () => {
    const { host: dir, binds } = sharedDir();
    const port = await freePort();
    const uri = `nbd://127.0.0.1:${port}/disk`;
    const ROUNDS = 119; // round i writes 8 x 64 KiB with pattern i at (8i + j) MiB, then flushes
    let flushed: number[] = [];
    let failed = '';
    await withPrivilegedContainer(
      async (client) => {
        await withPrivilegedContainer(
          async (server) => {
            await server.run(`vm-disk create -f qcow2 ${T}/disk.qcow2 1G`);
            await serveIn(
              server,
              serveArgs(
                `${T}/disk.qcow2`,
                'qcow2',
                `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
              ),
            );
            // Noise: a second client rewriting 960 MiB..1 GiB all along, so that the kill
            // lands in the middle of writes whatever the rounds are doing.
            await client.run(
              `mkdir -p /var/tmp/w && (while qemu-io -f raw -c 'write -P 0xee 960M 64M' ${uri} > /dev/null 2>&1; do :; done) &`,
            );
            await client.run(
              `(i=1; while [ $i -le ${ROUNDS} ]; do set --; j=0;` +
                ` while [ $j -lt 8 ]; do set -- "$@" -c "write -P $i $((i * 8 + j))M 64k"; j=$((j + 1)); done;` +
                ` if qemu-io -f raw "$@" -c flush ${uri} > /var/tmp/w/round.log 2>&1; then echo $i >> ${T}/flushed;` +
                ` else echo $i > ${T}/failed; cat /var/tmp/w/round.log >> ${T}/failed; break; fi;` +
                ` i=$((i + 1)); done; echo end > ${T}/writer-end) > /dev/null 2>&1 &`,
            );
            await waitIn(
              client,
              `[ $(cat ${T}/flushed 2>/dev/null | wc -l) -ge 10 ]`,
              `cat ${T}/failed ${T}/serve.log`,
            );
            execFileSync('docker', ['kill', '--signal', 'KILL', server.id]);
          },
          { image: TAG, binds },
        );
        await waitIn(client, `[ -f ${T}/writer-end ]`);
        flushed = readFileSync(join(dir, 'flushed'), 'utf8').trim().split('\n').map(Number);
        failed = (await client.exec(`cat ${T}/failed`)).stdout;
      },
      { binds },
    );
    // The kill interrupted the writer: a round failed, after at least 10 had flushed.
    expect(flushed.length).toBeGreaterThanOrEqual(10);
    expect(flushed).toEqual(flushed.map((_, k) => k + 1));
    expect(failed, 'the writer finished before the kill').not.toBe('');
    expect(Number(failed.split('\n')[0])).toBe(flushed.length + 1);

    const { code, report } = await qemuImgCheck(join(dir, 'disk.qcow2'));
    expect([0, 3], JSON.stringify(report)).toContain(code);
    expect(report['check-errors']).toBe(0);
    expect(report.corruptions ?? 0).toBe(0);

    const reads = flushed.flatMap((i) =>
      [0, 1, 2, 3, 4, 5, 6, 7].flatMap((j) => ['-c', `read -P ${i} ${i * 8 + j}M 64k`]),
    );
    const back = await host('qemu-io', ['-r', '-f', 'qcow2', ...reads, join(dir, 'disk.qcow2')]);
    expect(back.code, back.stdout + back.stderr).toBe(0);
    expect(back.stdout).not.toContain('Pattern verification failed');
    expect(back.stdout.match(/^read 65536\/65536 bytes/gm)).toHaveLength(flushed.length * 8);
  }, 120_000);
});

/** The QMP test client, keeping the events that arrive before the reply being waited for. */
class Qmp {
  private readonly events: QmpMessage[] = [];
  constructor(private readonly client: QmpTestClient) {}

  async exec(command: string, args?: Record<string, unknown>): Promise<QmpMessage> {
    this.client.sendRaw(
      `${JSON.stringify({ execute: command, ...(args && { arguments: args }) })}\n`,
    );
    for (;;) {
      const message = await this.client.next();
      if ('event' in message) this.events.push(message);
      else return message;
    }
  }

  async event(name: string): Promise<QmpMessage> {
    for (;;) {
      const k = this.events.findIndex((e) => e.event === name);
      if (k >= 0) return this.events.splice(k, 1)[0] as QmpMessage;
      this.events.push(await this.client.next());
    }
  }

  async nodeNames(): Promise<string[]> {
    const reply = await this.exec('query-named-block-nodes');
    return (reply.return as { 'node-name': string }[]).map((n) => n['node-name']);
  }

  /** blockdev-create as job `id`: waits for it to conclude without error and dismisses it. */
  async createJob(id: string, options: Record<string, unknown>): Promise<void> {
    expect(await this.exec('blockdev-create', { 'job-id': id, options })).toEqual({ return: {} });
    for (;;) {
      const e = await this.event('JOB_STATUS_CHANGE');
      if ((e.data as { id: string }).id !== id) continue;
      if ((e.data as { status: string }).status === 'concluded') break;
    }
    // As qemu-storage-daemon: a concluded blockdev-create job stays until job-dismiss.
    const jobs = (await this.exec('query-jobs')).return as Record<string, unknown>[];
    const job = jobs.find((j) => j.id === id);
    expect(job).toMatchObject({ id, type: 'create', status: 'concluded' });
    expect(job).not.toHaveProperty('error');
    expect(await this.exec('job-dismiss', { id })).toEqual({ return: {} });
    expect((await this.exec('query-jobs')).return).toEqual([]);
  }
}
