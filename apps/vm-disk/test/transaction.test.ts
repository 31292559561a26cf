// QMP `transaction`, side by side with qemu-storage-daemon 7.2: the incremental backup flow
// three times over (full backup and bitmap in one transaction, then incremental backups into
// overlays, each chain equal to the disk at its point-in-time and holding only the dirty
// clusters); a transaction whose last action fails (or is `abort`) leaves nothing behind;
// completion-mode grouped cancels every backup of the transaction when one fails, and
// keeps their bitmaps.
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import { Recorder } from './harness/qmp-recorder.ts';
import { type Daemon, sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-txn-');
const p = (name: string): string => scratch.path(name);
const KiB = 1024;
const MiB = 1024 * KiB;

/** No timestamp; generated node names (#block123) alike. */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage =>
  JSON.parse(JSON.stringify(rest).replace(/#block\d+/g, '#blockN')) as QmpMessage;

const create = (args: string[]) => run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args]);

/** A qcow2 node of the scratch image NAME.qcow2. */
function node(name: string, extra: Record<string, unknown> = {}): string[] {
  const file = { driver: 'file', filename: p(`${name}.qcow2`) };
  return ['--blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': name, file, ...extra })];
}

/** A qcow2 node whose file fails every data write (blkdebug: QEMU's rule, or ours). */
function failingNode(which: Daemon, name: string): string[] {
  const rule =
    which === 'qsd' ? { event: 'write_aio', errno: 5 } : { iotype: 'write', errno: 'EIO' };
  const image = { driver: 'file', filename: p(`${name}.qcow2`) };
  return node(name, { file: { driver: 'blkdebug', image, 'inject-error': [rule] } });
}

/** Runs `fn` with `node` exported over NBD (under its name), then deletes the export. */
async function exported(
  r: Recorder,
  writable: boolean,
  fn: (uri: string) => Promise<unknown>,
  node = 'src',
): Promise<void> {
  await r.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': node, writable });
  await fn(`nbd+unix:///${node}?socket=${p('nbd.sock')}`);
  const before = r.seen.length;
  await r.cmd('block-export-del', { id: 'e' });
  if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

/** Writes to src through NBD with qemu-io. */
function write(r: Recorder, cmds: string[]): Promise<void> {
  return exported(r, true, (uri) =>
    run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]),
  );
}

/** What a transaction left: the nodes, src's bitmaps and the jobs (replies reduced in place). */
async function leftovers(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const nodes = m.return as Record<string, unknown>[];
  m.return = {
    nodes: nodes.map((n) => n['node-name']).sort(),
    bitmaps: nodes.find((n) => n['node-name'] === 'src')?.['dirty-bitmaps'],
  };
  await r.cmd('query-jobs');
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  data: boolean;
}

/** The clusters an image holds itself (not its backing chain). */
async function ownData(img: string): Promise<number[][]> {
  const map = JSON.parse(await run('qemu-img', ['map', '--output=json', img])) as MapEntry[];
  return map.filter((m) => m.depth === 0 && m.data).map((m) => [m.start, m.length]);
}

describe('transaction against qemu-storage-daemon 7.2', () => {
  it('the incremental backup flow three times: full + bitmap in one transaction, then incrementals', async () => {
    const rounds = [
      ['write -P 0x33 0 4k', 'write -P 0x44 2M 128k'],
      ['write -P 0x55 1M 64k', 'write -P 0x66 4032k 64k'],
      ['write -P 0x77 0 64k', 'write -P 0x88 3M 8k'],
    ];
    await sideBySide(scratch, {
      prepare: async () => {
        await create([p('src.qcow2'), '4M']);
        await run('qemu-io', [
          '-c',
          'write -P 0x11 0 1M',
          '-c',
          'write -P 0x22 3M 64k',
          p('src.qcow2'),
        ]);
        await create([p('full.qcow2'), '4M']);
        let below = 'full';
        for (const inc of ['inc1', 'inc2', 'inc3']) {
          await create(['-b', p(`${below}.qcow2`), '-F', 'qcow2', p(`${inc}.qcow2`)]);
          below = inc;
        }
      },
      args: () => [
        ...node('src'),
        ...node('full'),
        ...node('inc1', { backing: 'full' }),
        ...node('inc2', { backing: 'inc1' }),
        ...node('inc3', { backing: 'inc2' }),
      ],
      bare,
      results: ['full.qcow2', 'inc1.qcow2', 'inc2.qcow2', 'inc3.qcow2'],
      scenario: async (r) => {
        await r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: p('nbd.sock') } } });
        const full = { 'job-id': 'full', device: 'src', target: 'full', sync: 'full' };
        await r.cmd('transaction', {
          actions: [
            { type: 'blockdev-backup', data: full },
            { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'b0' } },
          ],
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
        for (const [i, cmds] of rounds.entries()) {
          await write(r, cmds);
          const inc = `inc${i + 1}`;
          const data = {
            'job-id': inc,
            device: 'src',
            target: inc,
            sync: 'incremental',
            bitmap: 'b0',
          };
          await r.cmd('transaction', { actions: [{ type: 'blockdev-backup', data }] });
          await r.until('JOB_STATUS_CHANGE', 'null');
          // The chain full <- inc1 <- ... <- incN is the disk now (nothing was written since):
          // both read through the daemon (its images may hold unflushed metadata).
          const disk = p('disk.raw');
          await exported(r, false, (uri) => run('qemu-img', ['convert', '-O', 'raw', uri, disk]));
          await exported(
            r,
            false,
            (uri) => run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', disk, uri]),
            inc,
          );
          await leftovers(r);
        }
      },
    });
    // vm-disk's images: each incremental holds the clusters written in its round only.
    expect(await ownData(p('inc1.qcow2'))).toEqual([
      [0, 64 * KiB],
      [2 * MiB, 128 * KiB],
    ]);
    expect(await ownData(p('inc2.qcow2'))).toEqual([
      [MiB, 64 * KiB],
      [4032 * KiB, 64 * KiB],
    ]);
    expect(await ownData(p('inc3.qcow2'))).toEqual([
      [0, 64 * KiB],
      [3 * MiB, 64 * KiB],
    ]);
    await run('qemu-img', ['compare', p('src.qcow2'), p('inc3.qcow2')]);
  }, 120_000);

  it('a transaction whose last action fails leaves nothing behind: no bitmap, overlay or job', async () => {
    await sideBySide(scratch, {
      prepare: async () => {
        for (const f of ['src', 'full', 'ov', 'd0']) await create([p(`${f}.qcow2`), '4M']);
      },
      args: () => [...node('src'), ...node('full'), ...node('ov'), ...node('d0')],
      bare,
      results: ['src.qcow2', 'full.qcow2'],
      scenario: async (r) => {
        await r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: p('nbd.sock') } } });
        await r.cmd('block-dirty-bitmap-add', { node: 'src', name: 'old' });
        await r.cmd('block-dirty-bitmap-add', { node: 'full', name: 'f0', disabled: true });
        await write(r, ['write -P 0x11 64k 64k']);
        const all = [
          { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'b0' } },
          { type: 'block-dirty-bitmap-clear', data: { node: 'src', name: 'old' } },
          { type: 'block-dirty-bitmap-enable', data: { node: 'full', name: 'f0' } },
          {
            type: 'block-dirty-bitmap-merge',
            data: { node: 'src', target: 'old', bitmaps: ['b0'] },
          },
          {
            type: 'blockdev-backup',
            data: { 'job-id': 'j', device: 'src', target: 'full', sync: 'full' },
          },
          { type: 'block-dirty-bitmap-remove', data: { node: 'src', name: 'old' } },
          {
            type: 'drive-backup',
            data: { 'job-id': 'd', device: 'd0', target: p('db.qcow2'), sync: 'full' },
          },
          {
            type: 'blockdev-snapshot-sync',
            data: {
              'node-name': 'ov',
              'snapshot-file': p('snap.qcow2'),
              'snapshot-node-name': 'snap',
            },
          },
        ];
        await leftovers(r);
        const aborted = await r.cmd('transaction', {
          actions: [...all, { type: 'abort', data: {} }],
        });
        expect(aborted.error).toMatchObject({ desc: 'Transaction aborted using Abort action' });
        await leftovers(r);
        // The last one refused by its own checks (a bitmap of that name exists by then).
        const refused = await r.cmd('transaction', {
          actions: [...all, { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'b0' } }],
        });
        expect(refused.error).toMatchObject({ desc: 'Bitmap already exists: b0' });
        await leftovers(r);
        // Grouped completion is for backups only.
        await r.cmd('transaction', {
          actions: [all[0]],
          properties: { 'completion-mode': 'grouped' },
        });
        await r.cmd('transaction', { actions: [{ type: 'abort' }] });
        await r.cmd('transaction', { actions: [] });
        await leftovers(r);
      },
    });
  });

  it('completion-mode grouped: one backup fails, every backup of the transaction is cancelled, bitmaps kept', async () => {
    await sideBySide(scratch, {
      prepare: async () => {
        for (const f of ['src', 'full', 'bad']) await create([p(`${f}.qcow2`), '4M']);
        // Persistent bitmaps made dirty before the daemons open src.
        for (const b of ['b0', 'b1']) await run('qemu-img', ['bitmap', '--add', p('src.qcow2'), b]);
        await run('qemu-io', ['-c', 'write -P 0x11 0 4M', p('src.qcow2')]);
      },
      args: (which) => [...node('src'), ...node('full'), ...failingNode(which, 'bad')],
      // How far the slow job got when it was cancelled is a matter of timing.
      bare: (m) => {
        const b = bare(m);
        if (b.event === 'BLOCK_JOB_CANCELLED') delete (b.data as { offset?: number }).offset;
        return b;
      },
      results: [],
      scenario: async (r) => {
        const inc = { device: 'src', sync: 'incremental' };
        await r.cmd('transaction', {
          actions: [
            // Slow, so that it is still running when the other fails.
            {
              type: 'blockdev-backup',
              data: { ...inc, 'job-id': 'j1', target: 'full', bitmap: 'b0', speed: 65536 },
            },
            {
              type: 'blockdev-backup',
              data: { ...inc, 'job-id': 'j2', target: 'bad', bitmap: 'b1' },
            },
          ],
          properties: { 'completion-mode': 'grouped' },
        });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.until('JOB_STATUS_CHANGE', 'null');
        await leftovers(r);
      },
    });
  });

  it('block-dirty-bitmap-merge of no bitmaps changes nothing (QEMU source; qsd 7.2 crashes)', async () => {
    await create([p('src.qcow2'), '4M']);
    const qmp = p('qmp');
    await scratch.serve([...monitorArgs(qmp), ...node('src')]);
    const r = await Recorder.open(qmp);
    await r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: p('nbd.sock') } } });
    await r.cmd('block-dirty-bitmap-add', { node: 'src', name: 'b0' });
    await write(r, ['write 0 64k']);
    const merge = { node: 'src', target: 'b0', bitmaps: [] };
    expect(await r.cmd('block-dirty-bitmap-merge', merge)).toEqual({ return: {} });
    expect(
      await r.cmd('transaction', { actions: [{ type: 'block-dirty-bitmap-merge', data: merge }] }),
    ).toEqual({ return: {} });
    // A bad enum value is named by its member alone, as QEMU's visitor names it.
    expect(await r.cmd('transaction', { actions: [{ type: 'nope', data: {} }] })).toMatchObject({
      error: { desc: "Parameter 'type' does not accept value 'nope'" },
    });
    await leftovers(r);
    expect(r.seen.at(-2)).toMatchObject({
      return: { bitmaps: [{ name: 'b0', count: 64 * KiB, busy: false }] },
    });
    r.client.close();
  });
});
