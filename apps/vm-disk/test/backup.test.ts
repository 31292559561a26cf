// blockdev-backup and drive-backup over QMP, side by side with qemu-storage-daemon 7.2
// (same replies and events, same images), and the point-in-time under live writes: a
// backup while an NBD client writes has the disk as of the job's start; image fleecing
// (a backup sync=none into a temporary overlay, and copy-before-write + snapshot-access
// added by hand) exports a point-in-time a client reads over NBD while the disk changes.
import { rmSync } from 'node:fs';
import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import { monitorArgs, Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, type Daemon } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-backup-');
const p = (name: string): string => scratch.path(name);

/** No timestamp; generated node names (#block123) alike. */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage =>
  JSON.parse(JSON.stringify(rest).replace(/#block\d+/g, '#blockN')) as QmpMessage;

/** base.qcow2 (0x11 over 0-1M) <- src.qcow2 (0x22 at 3M+64k); dst, top: empty; small: 2M. */
async function makeImages(): Promise<void> {
  for (const f of ['base', 'src', 'dst', 'top', 'small', 'new', 'ex']) {
    rmSync(p(`${f}.qcow2`), { force: true });
  }
  const create = (args: string[]) => run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args]);
  await create([p('base.qcow2'), '4M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 1M', p('base.qcow2')]);
  await create(['-b', p('base.qcow2'), '-F', 'qcow2', p('src.qcow2')]);
  await run('qemu-io', ['-c', 'write -P 0x22 3M 64k', '-c', 'write -z 2M 64k', p('src.qcow2')]);
  await create([p('dst.qcow2'), '4M']);
  await create(['-b', p('base.qcow2'), '-F', 'qcow2', p('top.qcow2')]);
  await create([p('small.qcow2'), '2M']);
  await create([p('ex.qcow2'), '4M']);
}

const daemonArgs = (): string[] => {
  const node = (name: string, extra = '') =>
    `driver=qcow2,node-name=${name},${extra}file.driver=file,file.filename=${p(`${name}.qcow2`)}`;
  return [
    '--blockdev',
    node('src'),
    '--blockdev',
    node('dst'),
    '--blockdev',
    node('top'),
    '--blockdev',
    node('small'),
  ];
};

async function sideBySide(scenario: (r: Recorder) => Promise<void>, results: string[]) {
  await compare(scratch, { prepare: makeImages, args: daemonArgs, scenario, results, bare });
}

describe('backup against qemu-storage-daemon 7.2', () => {
  it('blockdev-backup: errors, then a full backup and its events', async () => {
    await sideBySide(
      async (r) => {
        const b = { 'job-id': 'b', device: 'src', target: 'dst', sync: 'full' };
        await r.cmd('blockdev-backup', { ...b, device: 'nope' });
        await r.cmd('blockdev-backup', { ...b, target: 'nope' });
        await r.cmd('blockdev-backup', { ...b, target: 'src' });
        await r.cmd('blockdev-backup', { ...b, target: 'small' });
        await r.cmd('blockdev-backup', { ...b, sync: 'incremental' });
        await r.cmd('blockdev-backup', { ...b, sync: 'bitmap' });
        await r.cmd('blockdev-backup', { ...b, bitmap: 'nope', sync: 'bitmap' });
        await r.cmd('blockdev-backup', { ...b, 'bitmap-mode': 'always' });
        await r.cmd('blockdev-backup', { ...b, 'job-id': undefined });
        await r.cmd('blockdev-backup', { ...b, speed: -1 });
        await r.cmd('blockdev-backup', b);
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('query-block-jobs');
      },
      ['dst.qcow2'],
    );
  });

  it('sync=top into an image backed by the base; cancel of a slow one; manual dismiss', async () => {
    await sideBySide(
      async (r) => {
        await r.cmd('blockdev-backup', {
          'job-id': 'c',
          device: 'src',
          target: 'dst',
          sync: 'full',
          speed: 1,
        });
        await r.cmd('block-job-cancel', { device: 'c' });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('blockdev-backup', {
          'job-id': 't',
          device: 'src',
          target: 'top',
          sync: 'top',
          'auto-dismiss': false,
          'filter-node-name': 'cbw',
        });
        await r.until('JOB_STATUS_CHANGE', 'concluded');
        await r.cmd('query-block-jobs');
        // The job goes (status null) before the reply, as in QEMU.
        await r.cmd('job-dismiss', { id: 't' });
      },
      ['dst.qcow2', 'top.qcow2'],
    );
  });

  it('drive-backup: a new compressed image, sync=top creating one over the base, an existing one', async () => {
    await sideBySide(
      async (r) => {
        await r.cmd('drive-backup', {
          'job-id': 'd',
          device: 'src',
          target: p('new.qcow2'),
          sync: 'full',
          format: 'qcow2',
          compress: true,
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('drive-backup', {
          'job-id': 'e',
          device: 'src',
          target: p('top2.qcow2'),
          sync: 'top',
          format: 'qcow2',
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
        // An existing image, its format probed.
        await r.cmd('drive-backup', {
          'job-id': 'x',
          device: 'src',
          target: p('ex.qcow2'),
          sync: 'full',
          mode: 'existing',
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      ['new.qcow2', 'top2.qcow2', 'ex.qcow2'],
    );
  });
});

/** A daemon of `which` over src.qcow2 (node d0), exported writable as 'disk'. */
async function liveDaemon(which: Daemon): Promise<{ r: Recorder; sock: string }> {
  const qmp = p(`${which}.qmp`);
  const sock = p(`${which}.sock`);
  const args = [
    ...monitorArgs(qmp),
    '--blockdev',
    `driver=qcow2,node-name=d0,file.driver=file,file.filename=${p('src.qcow2')}`,
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}`,
    '--export',
    'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
  ];
  const proc = which === 'qsd' ? await startQsd(args, qmp) : await startServe(args);
  scratch.running.push(proc);
  return { r: await Recorder.open(qmp), sock };
}

const MiB = 1 << 20;
const ok = async (r: Recorder, cmd: string, args: Record<string, unknown>): Promise<void> => {
  expect(await r.cmd(cmd, args)).toEqual({ return: {} });
};

/** A command, then its job's status `status`, which may come before the reply or after. */
async function okThen(r: Recorder, cmd: string, args: Record<string, unknown>, status: string) {
  const from = r.seen.length;
  await ok(r, cmd, args);
  const came = r.seen
    .slice(from)
    .some(
      (m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { status: string }).status === status,
    );
  if (!came) await r.until('JOB_STATUS_CHANGE', status);
}

/**
 * block-export-del, then waits until the export is gone (its event may come before the
 * reply). `hard` after a client was killed: the server may not have seen it go yet.
 */
async function exportDel(r: Recorder, id: string, mode?: 'hard'): Promise<void> {
  await ok(r, 'block-export-del', { id, ...(mode && { mode }) });
  for (;;) {
    const list = (await r.cmd('query-block-exports')).return as { id: string }[];
    if (!list.some((e) => e.id === id)) return;
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

/** src.qcow2 of 8 MiB, empty; dst.qcow2 and tmp.qcow2 (backed by src) beside it. */
async function liveImages(): Promise<void> {
  for (const f of ['src', 'dst', 'tmp']) rmSync(p(`${f}.qcow2`), { force: true });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '8M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('dst.qcow2'), '8M']);
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    p('src.qcow2'),
    '-F',
    'qcow2',
    p('tmp.qcow2'),
  ]);
}

/** qemu-io commands writing pattern `pat` in 64 KiB pieces every 512 KiB (+ an offset). */
const pattern = (pat: number, shift: number): string[] =>
  Array.from({ length: 16 }, (_, i) => `write -P ${pat} ${i * 512 * 1024 + shift} 64k`);

/** Reads what the NBD export `name` shows into a raw file. */
async function pull(sock: string, name: string, out: string): Promise<void> {
  await run('qemu-img', [
    'convert',
    '-f',
    'raw',
    '-O',
    'raw',
    `nbd+unix:///${name}?socket=${sock}`,
    out,
  ]);
}

/** The expected point-in-time: pattern A (0xa1) at shift 0 and 4k, as raw. */
async function pointInTime(out: string): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'raw', out, '8M']);
  await run('qemu-io', [
    '-f',
    'raw',
    ...[...pattern(0xa1, 0), ...pattern(0xa1, 4096)].flatMap((c) => ['-c', c]),
    out,
  ]);
}

describe.each(['vm-disk', 'qsd'] as const)('backup under live writes (%s)', (which) => {
  it('a full backup has every write acknowledged before it started, none after', async () => {
    await liveImages();
    const { r, sock } = await liveDaemon(which);
    await ok(r, 'blockdev-add', {
      driver: 'qcow2',
      'node-name': 'dst',
      file: { driver: 'file', filename: p('dst.qcow2') },
    });
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    for (const c of [...pattern(0xa1, 0), ...pattern(0xa1, 4096)]) await io.command(c);
    await ok(r, 'blockdev-backup', {
      'job-id': 'b',
      device: 'd0',
      target: 'dst',
      sync: 'full',
      speed: 4 * MiB,
    });
    // Pattern B over A, partly overlapping clusters the job has not reached.
    for (const c of pattern(0xb2, 32 * 1024)) await io.command(c);
    await r.until('JOB_STATUS_CHANGE', 'null');
    await io.command('flush');
    await io.kill();
    await ok(r, 'quit', {});
    r.client.close();
    await pointInTime(p('then.raw'));
    await run('qemu-img', ['check', p('dst.qcow2')]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', p('then.raw'), p('dst.qcow2')]);
  });

  it('fleecing: backup sync=none into an overlay, exported; and cbw + snapshot-access', async () => {
    await liveImages();
    const { r, sock } = await liveDaemon(which);
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    for (const c of [...pattern(0xa1, 0), ...pattern(0xa1, 4096)]) await io.command(c);
    await pointInTime(p('then.raw'));
    await ok(r, 'blockdev-add', {
      driver: 'qcow2',
      'node-name': 'tmp',
      file: { driver: 'file', filename: p('tmp.qcow2') },
      backing: 'd0',
    });
    await ok(r, 'blockdev-backup', { 'job-id': 'f', device: 'd0', target: 'tmp', sync: 'none' });
    await ok(r, 'block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'tmp', name: 'fleece' });
    // The client pulls the point-in-time while the disk is written.
    const writes = (async () => {
      for (const c of pattern(0xb2, 32 * 1024)) await io.command(c);
    })();
    await Promise.all([writes, pull(sock, 'fleece', p('fleece.raw'))]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p('then.raw'), p('fleece.raw')]);
    await exportDel(r, 'e1');
    await okThen(r, 'block-job-cancel', { device: 'f' }, 'null');
    await ok(r, 'blockdev-del', { 'node-name': 'tmp' });

    // QEMU 7.2's own way: the filter and the access node by hand, exported over NBD.
    await io.command('flush');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('tmp2.qcow2'), '8M']);
    await ok(r, 'blockdev-add', {
      driver: 'qcow2',
      'node-name': 'tmp2',
      file: { driver: 'file', filename: p('tmp2.qcow2') },
    });
    await io.kill();
    await exportDel(r, 'e0', 'hard');
    await ok(r, 'blockdev-add', {
      driver: 'copy-before-write',
      'node-name': 'cbw',
      file: 'd0',
      target: 'tmp2',
    });
    await ok(r, 'blockdev-add', { driver: 'snapshot-access', 'node-name': 'acc', file: 'cbw' });
    await ok(r, 'block-export-add', {
      type: 'nbd',
      id: 'e2',
      'node-name': 'cbw',
      name: 'disk',
      writable: true,
    });
    await ok(r, 'block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'acc', name: 'fleece2' });
    await run('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'raw',
      `nbd+unix:///disk?socket=${sock}`,
      p('then2.raw'),
    ]);
    const io2 = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    const writes2 = (async () => {
      for (const c of pattern(0xc3, 100 * 1024)) await io2.command(c);
    })();
    await Promise.all([writes2, pull(sock, 'fleece2', p('fleece2.raw'))]);
    await io2.kill();
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p('then2.raw'), p('fleece2.raw')]);
    // nbdinfo reads it too.
    const map = await run('nbdinfo', ['--map', `nbd+unix:///fleece2?socket=${sock}`]);
    expect(map).toMatch(/data/);
    await ok(r, 'quit', {});
    r.client.close();
  });
});
