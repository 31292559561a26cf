// The incremental backup flow over QMP, side by side with qemu-storage-daemon 7.2: a dirty
// bitmap, a full backup, writes through an NBD export, an incremental backup that fails
// (EIO on its target by blkdebug) and keeps the bitmap, more writes, then an incremental
// backup into an overlay of the full one. Same replies, events and images on both; the
// chain full <- inc equals the disk, and the incremental image holds the dirty clusters only.
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { type Daemon, sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-backup-inc-');
const p = (name: string): string => scratch.path(name);
const KiB = 1024;
const MiB = 1024 * KiB;

/** No timestamp; generated node names (#block123) alike. */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage =>
  JSON.parse(JSON.stringify(rest).replace(/#block\d+/g, '#blockN')) as QmpMessage;

/** src: 4 MiB, 0x11 over 0-1M and 0x22 at 3M; full, bad: empty; inc: over full. */
async function prepare(): Promise<void> {
  const create = (args: string[]) => run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args]);
  for (const f of ['src', 'full', 'bad']) await create([p(`${f}.qcow2`), '4M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 64k', p('src.qcow2')]);
  await create(['-b', p('full.qcow2'), '-F', 'qcow2', p('inc.qcow2')]);
}

/** src, full, inc (backed by full) and bad, whose file fails every data write. */
function args(which: Daemon): string[] {
  const file = (name: string) => ({ driver: 'file', filename: p(`${name}.qcow2`) });
  const node = (name: string, extra: Record<string, unknown> = {}) => [
    '--blockdev',
    JSON.stringify({ driver: 'qcow2', 'node-name': name, file: file(name), ...extra }),
  ];
  // QEMU's rule fires on qcow2's data writes, ours on every write of the file.
  const rule =
    which === 'qsd' ? { event: 'write_aio', errno: 5 } : { iotype: 'write', errno: 'EIO' };
  return [
    ...node('src'),
    ...node('full'),
    ...node('inc', { backing: 'full' }),
    ...node('bad', {
      file: { driver: 'blkdebug', image: file('bad'), 'inject-error': [rule] },
    }),
  ];
}

/** Writes through an NBD export of src with qemu-io (the export is made and deleted). */
async function write(r: Recorder, cmds: string[]): Promise<void> {
  await r.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', writable: true });
  const sock = p('nbd.sock');
  await run('qemu-io', [
    '-f',
    'raw',
    ...cmds.flatMap((c) => ['-c', c]),
    `nbd+unix:///src?socket=${sock}`,
  ]);
  const before = r.seen.length;
  await r.cmd('block-export-del', { id: 'e' });
  if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

/** src's dirty bitmaps as query-named-block-nodes lists them. */
async function bitmaps(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const nodes = m.return as Record<string, unknown>[];
  m.return = nodes.filter((n) => n['node-name'] === 'src').map((n) => n['dirty-bitmaps']);
}

describe('incremental backup against qemu-storage-daemon 7.2', () => {
  it('bitmap, full, a failed incremental keeps the bitmap, then an incremental into an overlay', async () => {
    await sideBySide(scratch, {
      prepare,
      args,
      bare,
      results: ['full.qcow2', 'inc.qcow2'],
      scenario: async (r) => {
        await r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: p('nbd.sock') } } });
        await r.cmd('block-dirty-bitmap-add', { node: 'src', name: 'b0' });
        await r.cmd('blockdev-backup', {
          'job-id': 'f',
          device: 'src',
          target: 'full',
          sync: 'full',
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await write(r, ['write -P 0x33 0 4k', 'write -P 0x44 2M 128k']);
        await bitmaps(r);
        const inc = { device: 'src', sync: 'incremental', bitmap: 'b0' };
        await r.cmd('blockdev-backup', { ...inc, 'job-id': 'x', target: 'inc', sync: 'bitmap' });
        await r.cmd('blockdev-backup', {
          ...inc,
          'job-id': 'x',
          target: 'inc',
          'bitmap-mode': 'never',
        });
        await r.cmd('blockdev-backup', { ...inc, 'job-id': 'x', target: 'bad' });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await bitmaps(r);
        await write(r, ['write -P 0x55 1M 64k']);
        await r.cmd('blockdev-backup', { ...inc, 'job-id': 'i', target: 'inc' });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await bitmaps(r);
      },
    });
    // vm-disk's images are the last ones: the chain is the disk, with only what changed.
    await run('qemu-img', ['compare', p('src.qcow2'), p('inc.qcow2')]);
    const map = JSON.parse(await run('qemu-img', ['map', '--output=json', p('inc.qcow2')])) as {
      start: number;
      length: number;
      depth: number;
      data: boolean;
    }[];
    const top = map.filter((m) => m.depth === 0 && m.data).map((m) => [m.start, m.length]);
    expect(top).toEqual([
      [0, 64 * KiB],
      [MiB, 64 * KiB],
      [2 * MiB, 128 * KiB],
    ]);
  });
});
