// The block-dirty-bitmap-* commands side by side with qemu-storage-daemon 7.2: the same QMP
// sequence on both, the same replies (errors included) and the same dirty-bitmaps in
// query-named-block-nodes, with writes made over an NBD export by qemu-io.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-dirty-bitmaps-');
const NAMES = ['q', 'v2', 'r', 'ro', 'n'];

/** qcow2 v3 (q), qcow2 v2 (v2), raw (r), a read-only qcow2 v3 (ro), null-co of 1 MiB (n). */
async function prepare(): Promise<void> {
  const p = scratch.path.bind(scratch);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('q.qcow2'), '64M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p('v2.qcow2'), '64M']);
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('r.raw'), '64M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('ro.qcow2'), '64M']);
}

function args(): string[] {
  const p = scratch.path.bind(scratch);
  const node = (name: string, driver: string, file: string, extra = '') =>
    `driver=${driver},node-name=${name},${extra}file.driver=file,file.filename=${p(file)}`;
  return [
    '--blockdev',
    node('q', 'qcow2', 'q.qcow2'),
    '--blockdev',
    node('v2', 'qcow2', 'v2.qcow2'),
    '--blockdev',
    node('r', 'raw', 'r.raw'),
    '--blockdev',
    node('ro', 'qcow2', 'ro.qcow2', 'read-only=on,'),
    '--blockdev',
    'driver=null-co,node-name=n,size=1048576',
  ];
}

/** query-named-block-nodes, recorded as the dirty-bitmaps of the named nodes only. */
async function bitmaps(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const nodes = m.return as Record<string, unknown>[];
  m.return = nodes
    .filter((n) => NAMES.includes(String(n['node-name'])))
    .map((n) => ({ 'node-name': n['node-name'], 'dirty-bitmaps': n['dirty-bitmaps'] }))
    .sort((a, b) => String(a['node-name']).localeCompare(String(b['node-name'])));
}

/** Writes through an NBD export of `node` with qemu-io (the export is made and deleted). */
async function write(r: Recorder, node: string, cmds: string[]): Promise<void> {
  const sock = scratch.path('nbd.sock');
  await r.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': node, writable: true });
  await run('qemu-io', [
    '-f',
    'raw',
    ...cmds.flatMap((c) => ['-c', c]),
    `nbd+unix:///${node}?socket=${sock}`,
  ]);
  const before = r.seen.length;
  await r.cmd('block-export-del', { id: 'e' });
  // The event may come before the reply or after it.
  if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

function compare(scenario: (r: Recorder) => Promise<void>) {
  return sideBySide(scratch, { prepare, args, scenario, results: [] });
}

const add = (r: Recorder, a: Record<string, unknown>) => r.cmd('block-dirty-bitmap-add', a);

describe('block-dirty-bitmap-* as qemu-storage-daemon 7.2', () => {
  it('add: options, defaults and every refusal', async () => {
    await compare(async (r) => {
      await add(r, { node: 'q', name: 'b0' });
      await add(r, { node: 'q', name: 'b0' });
      await add(r, { node: 'nope', name: 'b0' });
      await add(r, { node: 'q', name: '' });
      await add(r, { node: 'nope', name: '' });
      for (const granularity of [1000, 256, 2 ** 32, -1, 2 ** 31, 512]) {
        await add(r, { node: 'q', name: `g${granularity}`, granularity });
      }
      await add(r, { node: 'q', name: 'p', persistent: true });
      await add(r, { node: 'q', name: 'p', persistent: true });
      await add(r, { node: 'q', name: 'pd', persistent: true, disabled: true, granularity: 4096 });
      await add(r, { node: 'q', name: 'x'.repeat(1024), persistent: true });
      await add(r, { node: 'q', name: 'y'.repeat(1024) });
      await add(r, { node: 'q', name: 'z'.repeat(1023) });
      await add(r, { node: 'r', name: 'p', persistent: true });
      await add(r, { node: 'n', name: 'p', persistent: true });
      await add(r, { node: 'v2', name: 'p', persistent: true });
      await add(r, { node: 'ro', name: 'p', persistent: true });
      await add(r, { node: 'ro', name: 'm' });
      await add(r, { node: 'r', name: 'd', disabled: true, persistent: false });
      await add(r, { node: 'n', name: 'big', granularity: 2 ** 31 });
      await add(r, { node: 'q', name: 'bad', bogus: 1 });
      await add(r, { node: 'q' });
      await add(r, { node: 'q', name: 'bad', granularity: '4096' });
      await bitmaps(r);
    });
  });

  it('remove, clear, enable, disable and merge, with the dirty counts of writes', async () => {
    await compare(async (r) => {
      const path = scratch.path('nbd.sock');
      await r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path } } });
      await add(r, { node: 'q', name: 'b0' });
      await add(r, { node: 'q', name: 'small', granularity: 4096 });
      await add(r, { node: 'q', name: 'off', disabled: true });
      await add(r, { node: 'r', name: 'other', granularity: 512 });
      await add(r, { node: 'n', name: 'tiny' });
      await write(r, 'q', ['write 0 4k', 'write 1M 100k', 'write -z 8M 64k', 'discard 16M 64k']);
      await write(r, 'r', ['write 3M 1k']);
      await bitmaps(r);
      for (const verb of ['remove', 'clear', 'enable', 'disable']) {
        await r.cmd(`block-dirty-bitmap-${verb}`, { node: 'q', name: 'zz' });
        await r.cmd(`block-dirty-bitmap-${verb}`, { node: 'zz', name: 'b0' });
      }
      await r.cmd('block-dirty-bitmap-disable', { node: 'q', name: 'b0' });
      await r.cmd('block-dirty-bitmap-disable', { node: 'q', name: 'b0' });
      await r.cmd('block-dirty-bitmap-enable', { node: 'q', name: 'off' });
      await write(r, 'q', ['write 32M 64k']);
      await bitmaps(r);
      const merge = (node: string, target: string, list: unknown[]) =>
        r.cmd('block-dirty-bitmap-merge', { node, target, bitmaps: list });
      await merge('q', 'off', ['small', { node: 'r', name: 'other' }]);
      await merge('q', 'off', ['zz']);
      await merge('q', 'zz', ['b0']);
      await merge('q', 'off', [{ node: 'zz', name: 'b0' }]);
      await merge('q', 'off', [{ node: 'r', name: 'zz' }]);
      await merge('q', 'b0', ['small', { node: 'n', name: 'tiny' }]);
      await merge('q', 'b0', ['b0', 'b0']);
      await merge('q', 'b0', [7]);
      await merge('q', 'b0', [{ node: 'q' }]);
      await r.cmd('block-dirty-bitmap-merge', { node: 'q', target: 'b0', bitmaps: 'b0' });
      await bitmaps(r);
      await r.cmd('block-dirty-bitmap-clear', { node: 'q', name: 'small' });
      await r.cmd('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
      await r.cmd('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
      await bitmaps(r);
    });
  });
});
