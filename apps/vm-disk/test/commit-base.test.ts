// block-commit into a read-only base, and into a base smaller than top, side by side with
// qemu-storage-daemon 7.2: QEMU reopens base read-write for the job (and back afterwards
// where it does) and grows base to top's size; the same replies, events, read-only flags
// and images on both.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain, nodeGraph } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-commit-base-');

/** base (0x11 at 0-1M) <- mid (0x22 at 1M+512k) <- top (0x33 at 3M+64k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 512k'],
  top: ['write -P 0x33 3M 64k'],
};

/** The same chain, mid and top grown to 8 MiB with data past base's end. */
async function grownChain(): Promise<void> {
  await makeChain(scratch, CHAIN);
  for (const [img, cmd] of [
    ['mid.qcow2', 'write -P 0x44 5M 256k'],
    ['top.qcow2', 'write -P 0x55 7M 64k'],
  ] as const) {
    await run('qemu-img', ['resize', '-q', scratch.path(img), '8M']);
    await run('qemu-io', ['-c', cmd, scratch.path(img)]);
  }
}

/** Each named node's read-only flag and size (implicit nodes aside), sorted. */
async function nodes(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const all = m.return as { 'node-name': string; ro: boolean; image: { 'virtual-size': number } }[];
  m.return = all
    .filter((n) => !n['node-name'].startsWith('#'))
    .map((n) => ({ 'node-name': n['node-name'], ro: n.ro, size: n.image['virtual-size'] }))
    .sort((a, b) => a['node-name'].localeCompare(b['node-name']));
}

/** base read-only (and its file with it), mid and top read-write. */
function args(): string[] {
  const layer = (name: string, extra: Record<string, unknown>) => [
    '--blockdev',
    JSON.stringify({
      driver: 'qcow2',
      'node-name': name,
      ...extra,
      file: {
        driver: 'file',
        'node-name': `${name}-file`,
        filename: scratch.path(`${name}.qcow2`),
      },
    }),
  ];
  return [
    ...layer('base', { 'read-only': true }),
    ...layer('mid', { backing: 'base' }),
    ...layer('top', { backing: 'mid' }),
  ];
}

function sideBySide(prepare: () => Promise<void>, scenario: (r: Recorder) => Promise<void>) {
  return compare(scratch, {
    prepare,
    args,
    scenario,
    results: ['top.qcow2', 'base.qcow2'],
  });
}

const chain = () => makeChain(scratch, CHAIN);
const intermediate = { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base' };
const active = { 'job-id': 'c', device: 'top', 'base-node': 'base' };

async function completeActive(r: Recorder): Promise<void> {
  await r.cmd('block-commit', active);
  await r.until('BLOCK_JOB_READY');
  await nodes(r);
  await r.cmd('block-job-complete', { device: 'c' });
  await r.until('JOB_STATUS_CHANGE', 'null');
  await nodes(r);
}

describe('block-commit into a read-only or smaller base, against qemu-storage-daemon 7.2', () => {
  it('intermediate commit into a read-only base: reopened read-write for the job, then back', async () => {
    await sideBySide(chain, async (r) => {
      await nodes(r);
      await r.cmd('block-commit', intermediate);
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodes(r);
    });
  });

  it('an intermediate commit without filter-node-name has an implicit read-only commit_top', async () => {
    await sideBySide(chain, async (r) => {
      await r.cmd('block-commit', { ...intermediate, speed: 1 });
      await nodeGraph(r);
      await r.cmd('block-job-set-speed', { device: 'c', speed: 0 });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodeGraph(r);
    });
  });

  it('active commit into a read-only base, completed', async () => {
    await sideBySide(chain, completeActive);
  });

  it('active commit into a read-only base, cancelled when ready', async () => {
    await sideBySide(chain, async (r) => {
      await r.cmd('block-commit', active);
      await r.until('BLOCK_JOB_READY');
      await r.cmd('block-job-cancel', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodes(r);
    });
  });

  it('intermediate commit grows a smaller base to top', async () => {
    await sideBySide(grownChain, async (r) => {
      await r.cmd('block-commit', intermediate);
      await r.until('JOB_STATUS_CHANGE', 'null');
      await nodes(r);
    });
  });

  it('active commit grows a smaller base to top', async () => {
    await sideBySide(grownChain, completeActive);
  });
});
