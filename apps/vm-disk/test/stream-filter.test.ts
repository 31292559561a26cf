// block-stream's copy-on-read filter and the copy-on-read driver's `bottom`, side by side
// with qemu-storage-daemon 7.2: the filter node a stream puts above top (implicit or named),
// the errors of `bottom`, and what reads through a copy-on-read node copy into top.
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain, nodeGraph } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-stream-filter-');
const p = scratch.path.bind(scratch);
const MiB = 1 << 20;

/** base (0x11 at 0-1M) <- mid (0x22 at 1-2M) <- top (0x33 at 3M+512k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 1M'],
  top: ['write -P 0x33 3M 512k'],
};

/** The chain as named nodes: base <- mid <- top, each over its file node. */
function args(): string[] {
  const layer = (name: string, extra: Record<string, unknown>) => [
    '--blockdev',
    JSON.stringify({
      driver: 'qcow2',
      'node-name': name,
      ...extra,
      file: { driver: 'file', 'node-name': `${name}-file`, filename: p(`${name}.qcow2`) },
    }),
  ];
  return [
    ...layer('base', {}),
    ...layer('mid', { backing: 'base' }),
    ...layer('top', { backing: 'mid' }),
  ];
}

/** Reads [0, 4M) of `node` through an NBD export (made and deleted). */
async function readThrough(r: Recorder, node: string): Promise<void> {
  await r.cmd('block-export-add', { type: 'nbd', id: 'e', 'node-name': node });
  await run('qemu-io', [
    '-r',
    '-f',
    'raw',
    '-c',
    `read 0 ${4 * MiB}`,
    `nbd+unix:///${node}?socket=${p('nbd.sock')}`,
  ]);
  const before = r.seen.length;
  await r.cmd('block-export-del', { id: 'e' });
  if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
    await r.until('BLOCK_EXPORT_DELETED');
  }
}

/**
 * top.qcow2's own allocation (qemu-img map of top alone, depth 0 entries), adjacent guest
 * ranges merged: where the copies land in the file is the daemon's business.
 */
async function topAllocation(): Promise<{ start: number; length: number }[]> {
  const map = JSON.parse(
    await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', p('top.qcow2')]),
  ) as { start: number; length: number; depth: number; data: boolean }[];
  const out: { start: number; length: number }[] = [];
  for (const e of map) {
    if (e.depth !== 0 || !e.data) continue;
    const last = out.at(-1);
    if (last && last.start + last.length === e.start) last.length += e.length;
    else out.push({ start: e.start, length: e.length });
  }
  return out;
}

/**
 * Runs `scenario` on each daemon; returns top's allocation after each run (qsd's, then
 * vm-disk's), taken once the daemon has quit: qsd's before the chain is made again for
 * vm-disk (in prepare), vm-disk's at the end.
 */
async function sideBySide(scenario: (r: Recorder) => Promise<void>) {
  const maps: { start: number; length: number }[][] = [];
  let runs = 0;
  await compare(scratch, {
    prepare: async () => {
      if (runs++ > 0 && existsSync(p('top.qcow2'))) maps.push(await topAllocation());
      await makeChain(scratch, CHAIN);
    },
    args,
    scenario,
    results: ['top.qcow2'],
  });
  maps.push(await topAllocation());
  return maps;
}

const nbdStart = (r: Recorder) =>
  r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: p('nbd.sock') } } });

describe('block-stream copy-on-read filter, against qemu-storage-daemon 7.2', () => {
  it('an implicit copy-on-read node sits above top during a stream, gone after', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's', device: 'top', speed: 1 });
      await nodeGraph(r);
      await r.cmd('block-job-set-speed', { device: 's', speed: 0 });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodeGraph(r);
    });
  });

  it('a cancelled stream takes its filter away and leaves the chain', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's', device: 'top', speed: 1 });
      await r.cmd('block-job-cancel', { device: 's' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodeGraph(r);
    });
  });

  it('bottom and filter-node-name: errors, then a named filter and base kept', async () => {
    await sideBySide(async (r) => {
      const s = { 'job-id': 's', device: 'top' };
      await r.cmd('block-stream', { ...s, bottom: 'mid', base: 'x' });
      await r.cmd('block-stream', { ...s, bottom: 'mid', 'base-node': 'x' });
      await r.cmd('block-stream', { ...s, bottom: 'nope' });
      await r.cmd('block-stream', { ...s, bottom: 'top-file' });
      await r.cmd('block-stream', { ...s, bottom: 'mid', 'backing-file': 'x' });
      await r.cmd('block-stream', { ...s, bottom: 'mid', speed: 1, 'filter-node-name': 'cor' });
      await nodeGraph(r);
      await r.cmd('block-job-set-speed', { device: 's', speed: 0 });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodeGraph(r);
    });
  });
});

describe('blockdev-add copy-on-read, against qemu-storage-daemon 7.2', () => {
  it('reads through it copy the chain into top', async () => {
    const maps = await sideBySide(async (r) => {
      await nbdStart(r);
      await r.cmd('blockdev-add', {
        driver: 'copy-on-read',
        'node-name': 'c',
        file: 'top',
        bottom: 'nope',
      });
      await r.cmd('blockdev-add', { driver: 'copy-on-read', 'node-name': 'c', file: 'top' });
      await readThrough(r, 'c');
    });
    expect(maps[1]).toEqual(maps[0]);
    // base's and mid's data, and top's own.
    expect(maps[1]).toEqual([
      { start: 0, length: 2 * MiB },
      { start: 3 * MiB, length: MiB / 2 },
    ]);
  });

  it('bottom limits the copy to the layers down to it', async () => {
    const maps = await sideBySide(async (r) => {
      await nbdStart(r);
      await r.cmd('blockdev-add', {
        driver: 'copy-on-read',
        'node-name': 'c',
        file: 'top',
        bottom: 'mid',
      });
      await readThrough(r, 'c');
    });
    expect(maps[1]).toEqual(maps[0]);
    // mid's data copied, base's not.
    expect(maps[1]).toEqual([
      { start: MiB, length: MiB },
      { start: 3 * MiB, length: MiB / 2 },
    ]);
  });
});
