// blockdev-reopen side by side with qemu-storage-daemon 7.2: the same QMP sequence on both
// gives the same replies (read-only <-> read-write of a qcow2 node and the file it opened
// inline, the refusals in QEMU's words) and the same images afterwards.
import { describe, it } from 'vitest';
import { useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-blockdev-reopen-');

const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 512k'],
  top: ['write -P 0x33 3M 64k'],
};

/** Each node's name and read-only flag (what both daemons answer alike), sorted. */
async function readOnly(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const nodes = m.return as { 'node-name': string; ro: boolean }[];
  m.return = nodes
    .map((n) => ({ 'node-name': n['node-name'], ro: n.ro }))
    .sort((a, b) => a['node-name'].localeCompare(b['node-name']));
}

const file = (name: string) => ({
  driver: 'file',
  'node-name': `${name}-file`,
  filename: scratch.path(`${name}.qcow2`),
});

/** base read-only over a file it opens inline; mid over a file node of its own, read-only. */
function args(): string[] {
  const blockdev = (o: unknown) => ['--blockdev', JSON.stringify(o)];
  return [
    ...blockdev({ driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: file('base') }),
    ...blockdev({ ...file('mid'), 'read-only': true }),
    ...blockdev({
      driver: 'qcow2',
      'node-name': 'mid',
      'read-only': true,
      backing: 'base',
      file: 'mid-file',
    }),
    ...blockdev({ driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: file('top') }),
  ];
}

function sideBySide(scenario: (r: Recorder) => Promise<void>) {
  return compare(scratch, {
    prepare: () => makeChain(scratch, CHAIN),
    args,
    scenario,
    results: ['top.qcow2'],
  });
}

const reopen = (r: Recorder, ...options: unknown[]) => r.cmd('blockdev-reopen', { options });

describe('blockdev-reopen against qemu-storage-daemon 7.2', () => {
  it('read-only <-> read-write: inline children follow, named ones are refused, then both at once', async () => {
    await sideBySide(async (r) => {
      await readOnly(r);
      // Refused: the file kept by name keeps its read-only unless base's options set it.
      const base = { driver: 'qcow2', 'node-name': 'base', file: 'base-file' };
      await reopen(r, base);
      await reopen(r, { ...base, 'read-only': false });
      await readOnly(r);
      await reopen(r, { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: 'mid-file' });
      await reopen(
        r,
        { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: 'mid-file' },
        file('mid'),
      );
      await readOnly(r);
      await reopen(r, {
        driver: 'qcow2',
        'node-name': 'base',
        'read-only': true,
        file: 'base-file',
      });
      await readOnly(r);
    });
  });

  it('what may not change is refused in QEMU words', async () => {
    await sideBySide(async (r) => {
      const top = { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: 'top-file' };
      await reopen(r, { ...top, driver: 'raw' });
      await reopen(r, { ...top, 'node-name': 'nope' });
      const { 'node-name': _, ...unnamed } = top;
      await reopen(r, unnamed);
      const { file: __, ...fileless } = top;
      await reopen(r, fileless);
      const { backing: ___, ...backingless } = top;
      await reopen(r, backingless);
      await reopen(r, { ...file('top'), filename: scratch.path('mid.qcow2') });
      await reopen(r, { ...file('top'), locking: 'off' });
      await reopen(r, { ...file('top'), aio: 'threads' });
      await reopen(r, { ...file('top'), 'read-only': true });
      await reopen(r, { ...top, 'read-only': true, 'force-share': true });
      await reopen(r, { ...top, 'lazy-refcounts': true });
      await readOnly(r);
    });
  });
});
