// blockdev-mirror with `replaces`, side by side with qemu-storage-daemon 7.2: the node named
// (below the source, through filters) is what the target takes the place of at completion,
// the source staying; the refusals in QEMU's words; the same graph and images after.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-mirror-replaces-');

const qcow2 = (name: string) => ({
  driver: 'qcow2',
  'node-name': name,
  file: { driver: 'file', 'node-name': `${name}-file`, filename: scratch.path(`${name}.qcow2`) },
});

/** disk under a filter src (blkdebug, no rules), a target tgt, and an unrelated node. */
function args(): string[] {
  return [qcow2('disk'), { driver: 'blkdebug', 'node-name': 'src', image: 'disk' }, qcow2('tgt')]
    .concat([qcow2('other')])
    .flatMap((o) => ['--blockdev', JSON.stringify(o)]);
}

/** The graph's edges as (parent, child name, child), implicit nodes as '#', sorted. */
async function edges(r: Recorder): Promise<void> {
  const m = await r.cmd('x-debug-query-block-graph');
  const g = m.return as {
    nodes: { id: number; name: string }[];
    edges: { parent: number; child: number; name: string }[];
  };
  const name = (id: number) => {
    const n = g.nodes.find((x) => x.id === id)!.name;
    return n.startsWith('#') ? '#' : n;
  };
  m.return = g.edges
    .map((e) => [name(e.parent), e.name, name(e.child)].join(' '))
    .filter((e) => !e.startsWith('#'))
    .sort();
}

describe('blockdev-mirror replaces against qemu-storage-daemon 7.2', () => {
  it('refusals, then the target takes the place of the node below the filter', async () => {
    await compare(scratch, {
      prepare: async () => {
        for (const [img, size] of [
          ['disk', '4M'],
          ['tgt', '4M'],
          ['other', '8M'],
        ] as const) {
          await run('qemu-img', [
            'create',
            '-q',
            '-f',
            'qcow2',
            scratch.path(`${img}.qcow2`),
            size,
          ]);
        }
        await run('qemu-io', ['-c', 'write -P 0x5a 0 1M', scratch.path('disk.qcow2')]);
      },
      args,
      scenario: async (r) => {
        const mirror = (replaces: string, device = 'src') =>
          r.cmd('blockdev-mirror', {
            'job-id': 'm',
            device,
            target: 'tgt',
            sync: 'full',
            replaces,
          });
        for (const bad of ['nope', 'tgt', 'other', 'disk-file']) await mirror(bad);
        await mirror('src', 'disk');
        await mirror('disk');
        await r.until('BLOCK_JOB_READY');
        await r.cmd('blockdev-del', { 'node-name': 'disk' });
        await r.cmd('block-job-complete', { device: 'm' });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await edges(r);
        await r.cmd('blockdev-del', { 'node-name': 'disk' });
      },
      results: ['tgt.qcow2', 'disk.qcow2'],
    });
  });
});
