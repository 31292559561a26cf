// Persistent dirty bitmaps of `vm-disk serve` against qemu-storage-daemon 7.2: the same QMP
// gives the same replies and leaves the same image (qemu-img info lists the same bitmaps,
// qemu-img check clean, qemu-nbd reads the same dirty extents); while open, the bitmaps
// are in use in the image; kill -9 leaves them in use, so that both daemons reopen them as
// inconsistent, and only removable.
import { copyFileSync } from 'node:fs';
import { qemuDirtyExtents, qemuImgBitmaps } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';
import { monitorArgs, type Recorder } from './harness/qmp-recorder.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-bitmaps-persistent-');

const node = (img: string) =>
  `driver=qcow2,node-name=q,file.driver=file,file.filename=${scratch.path(img)}`;

const infoBitmaps = (img: string) => qemuImgBitmaps(scratch.path(img));
const qemuDirty = (img: string, name: string) => qemuDirtyExtents(scratch.path(img), name);

/** Writes through an NBD export of node q with qemu-io (the export made and deleted). */
async function write(r: Recorder, cmds: string[]): Promise<void> {
  await r.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'q', writable: true });
  await run('qemu-io', [
    '-f',
    'raw',
    ...cmds.flatMap((c) => ['-c', c]),
    `nbd+unix:///q?socket=${scratch.path('nbd.sock')}`,
  ]);
  const before = r.seen.length;
  await r.cmd('block-export-del', { id: 'e' });
  if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

/** query-named-block-nodes, recorded as node q's dirty-bitmaps only. */
async function bitmaps(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const q = (m.return as Record<string, unknown>[]).find((n) => n['node-name'] === 'q');
  m.return = q?.['dirty-bitmaps'];
}

describe('persistent dirty bitmaps as qemu-storage-daemon 7.2', () => {
  it('stored at quit: the same image, bitmaps and dirty extents', async () => {
    const dirty: Record<string, unknown> = {};
    let which = 'qsd';
    await sideBySide(scratch, {
      prepare: async () => {
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path('q.qcow2'), '64M']);
        await run('qemu-img', ['bitmap', '--add', '-g', '16384', scratch.path('q.qcow2'), 'old']);
        await run('qemu-io', ['-f', 'qcow2', '-c', 'write 2M 4k', scratch.path('q.qcow2')]);
      },
      args: (w) => {
        which = w;
        return ['--blockdev', node('q.qcow2')];
      },
      scenario: async (r) => {
        await r.cmd('nbd-server-start', {
          addr: { type: 'unix', data: { path: scratch.path('nbd.sock') } },
        });
        const add = (a: Record<string, unknown>) =>
          r.cmd('block-dirty-bitmap-add', { node: 'q', ...a });
        await add({ name: 'b0', persistent: true });
        await add({ name: 'fine', persistent: true, granularity: 512 });
        await add({ name: 'off', persistent: true, disabled: true });
        await add({ name: 'mem' });
        await add({ name: 'gone', persistent: true });
        await bitmaps(r);
        await write(r, ['write 0 1536', 'write 40M 512', 'write -z 60M 1M']);
        await r.cmd('block-dirty-bitmap-remove', { node: 'q', name: 'gone' });
        await r.cmd('block-dirty-bitmap-disable', { node: 'q', name: 'old' });
        await write(r, ['write 50M 4k']);
        await bitmaps(r);
        // In use in the image while open.
        r.seen.push({ info: await infoBitmaps('q.qcow2') });
        // Resized: the bitmaps follow, and are stored at the new size.
        await r.cmd('block_resize', { 'node-name': 'q', size: 128 << 20 });
        await write(r, ['write 100M 4k']);
        await bitmaps(r);
      },
      results: ['q.qcow2'],
    });
    // The image the last run (vm-disk) left: QEMU reads the bits.
    for (const name of ['b0', 'fine', 'off', 'old']) dirty[name] = await qemuDirty('q.qcow2', name);
    expect(which).toBe('vm-disk');
    const K = 1024;
    const M = K * K;
    const at = (offset: number, length: number) => ({ offset, length });
    expect(dirty).toEqual({
      b0: [
        at(0, 64 * K),
        at(40 * M, 64 * K),
        at(50 * M, 64 * K),
        at(60 * M, M),
        at(100 * M, 64 * K),
      ],
      fine: [at(0, 1536), at(40 * M, 512), at(50 * M, 4 * K), at(60 * M, M), at(100 * M, 4 * K)],
      off: [],
      old: [at(0, 16 * K), at(2 * M, 16 * K), at(40 * M, 16 * K), at(60 * M, M)],
    });
  }, 60_000);

  it('kill -9 leaves them in use: inconsistent on reopen, as QEMU sees them; check clean', async () => {
    const img = scratch.path('q.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    // A fresh monitor socket per daemon: a dead one's file would pass for the next's.
    let n = 0;
    let qmp = '';
    const nextQmp = () => {
      qmp = scratch.path(`m${n++}.qmp`);
      return monitorArgs(qmp);
    };
    const session = async (p: Awaited<ReturnType<typeof startServe>>) => {
      scratch.running.push(p);
      const { client } = await QmpTestClient.connect(qmp);
      await client.execute({ execute: 'qmp_capabilities' });
      return client;
    };
    // Stored once (a clean quit), then opened again and killed.
    let p = await startServe([...nextQmp(), '--blockdev', node('q.qcow2')]);
    let c = await session(p);
    await c.execute({
      execute: 'block-dirty-bitmap-add',
      arguments: { node: 'q', name: 'b0', persistent: true },
    });
    await c.execute({ execute: 'quit' });
    await p.exited;
    c.close();
    expect(await infoBitmaps('q.qcow2')).toEqual([
      { name: 'b0', granularity: 65536, flags: ['auto'] },
    ]);
    p = await startServe([...nextQmp(), '--blockdev', node('q.qcow2')]);
    c = await session(p);
    expect(await infoBitmaps('q.qcow2')).toEqual([
      { name: 'b0', granularity: 65536, flags: ['in-use', 'auto'] },
    ]);
    await p.stop('SIGKILL');
    c.close();
    await run('qemu-img', ['check', '-q', img]);
    copyFileSync(img, scratch.path('qsd.qcow2'));
    // The same QMP on both: the bitmap is listed inconsistent, refused, removable.
    const replies: Record<string, unknown[]> = {};
    for (const which of ['qsd', 'vm-disk'] as const) {
      const file = which === 'qsd' ? 'qsd.qcow2' : 'q.qcow2';
      const args = [...nextQmp(), '--blockdev', node(file)];
      p = which === 'qsd' ? await startQsd(args, qmp) : await startServe(args);
      c = await session(p);
      const seen: unknown[] = [];
      const cmd = async (execute: string, a?: Record<string, unknown>) => {
        const m = await c.execute({ execute, ...(a && { arguments: a }) });
        seen.push(m);
        return m;
      };
      const q = async () => {
        const m = await c.execute({ execute: 'query-named-block-nodes' });
        const n = (m.return as Record<string, unknown>[]).find((x) => x['node-name'] === 'q');
        seen.push(n?.['dirty-bitmaps']);
      };
      await q();
      seen.push(await infoBitmaps(file));
      await cmd('block-dirty-bitmap-clear', { node: 'q', name: 'b0' });
      await cmd('block-dirty-bitmap-enable', { node: 'q', name: 'b0' });
      await cmd('block-dirty-bitmap-add', { node: 'q', name: 'b1', persistent: true });
      await cmd('block-dirty-bitmap-merge', { node: 'q', target: 'b1', bitmaps: ['b0'] });
      await cmd('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
      await q();
      seen.push(await infoBitmaps(file));
      await cmd('quit');
      await p.exited;
      c.close();
      seen.push(await infoBitmaps(file));
      await run('qemu-img', ['check', '-q', scratch.path(file)]);
      replies[which] = seen;
    }
    expect(replies['vm-disk']).toEqual(replies.qsd);
  }, 60_000);
});
