// Block jobs, snapshots and resize over QMP, side by side with qemu-storage-daemon 7.2:
// the same QMP sequence on both gives the same replies, events (in order, timestamps
// aside) and resulting images (guest data, backing chain, qemu-img check clean).
import { rmSync } from 'node:fs';
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-block-jobs-');
const MiB = 1 << 20;

/** base (0x11 at 0-1M) <- mid (0x22 at 1-2M) <- top (0x33 at 3M+512k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 1M'],
  top: ['write -P 0x33 3M 512k'],
};

/** Runs `scenario` on a fresh chain with each daemon; compares what each recorded and left. */
async function sideBySide(
  args: string[],
  scenario: (r: Recorder) => Promise<void>,
  result: string,
): Promise<void> {
  await compare(scratch, {
    prepare: async () => {
      rmSync(scratch.path('snap.qcow2'), { force: true });
      await makeChain(scratch, CHAIN);
    },
    args: () => args,
    scenario,
    results: [result],
  });
}

const topArgs = () => [
  '--blockdev',
  `driver=file,node-name=tf,filename=${scratch.path('top.qcow2')}`,
  '--blockdev',
  'driver=qcow2,node-name=top,file=tf',
];

describe('block jobs against qemu-storage-daemon 7.2', () => {
  it('block-stream: errors, busy nodes, set-speed, manual finalize, the chain after', async () => {
    await sideBySide(
      topArgs(),
      async (r) => {
        await r.cmd('block-stream', { device: 'top' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'top', base: 'x', 'base-node': 'y' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'top', 'base-node': 'y' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'top', 'base-node': 'tf' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'top', 'backing-file': 'f' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'nope' });
        await r.cmd('block-stream', { 'job-id': '1j', device: 'top' });
        await r.cmd('block-stream', { 'job-id': 'j', device: 'top', base: 'nope.qcow2' });
        // speed 1: the job sleeps after its first chunk until the speed changes.
        const base = scratch.path('base.qcow2');
        await r.cmd('block-stream', { 'job-id': 's1', device: 'top', base, speed: 1 });
        await r.cmd('query-block-jobs', undefined, ['offset', 'busy']);
        await r.cmd('block-stream', { 'job-id': 's2', device: 'top' });
        await r.cmd('blockdev-del', { 'node-name': 'top' });
        await r.cmd('block_resize', { 'node-name': 'top', size: 8 * MiB });
        await r.cmd('block-job-set-speed', { device: 'nope', speed: 0 });
        await r.cmd('block-job-set-speed', { device: 's1', speed: -1 });
        await r.cmd('block-job-set-speed', { device: 's1', speed: 0 });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('query-block-jobs');
        // The rest of the chain into top, finalized and dismissed by hand.
        await r.cmd('block-stream', {
          'job-id': 's3',
          device: 'top',
          'auto-finalize': false,
          'auto-dismiss': false,
        });
        await r.until('BLOCK_JOB_PENDING');
        await r.cmd('query-block-jobs');
        await r.cmd('block-job-dismiss', { id: 's3' });
        await r.cmd('block-job-finalize', { id: 's3' });
        await r.cmd('query-block-jobs');
        await r.cmd('block-job-dismiss', { id: 's3' });
        await r.cmd('query-block-jobs');
      },
      'top.qcow2',
    );
  });

  it('block_resize and blockdev-snapshot-sync, and the images they leave', async () => {
    await sideBySide(
      topArgs(),
      async (r) => {
        await r.cmd('block_resize', { 'node-name': 'nope', size: MiB });
        await r.cmd('block_resize', { size: MiB });
        await r.cmd('block_resize', { 'node-name': 'top', size: -1 });
        await r.cmd('block_resize', { 'node-name': 'top', size: 8 * MiB + 1 });
        await r.cmd('block_resize', { 'node-name': 'top', size: 8 * MiB });
        await r.cmd('block_resize', { 'node-name': 'top', size: 6 * MiB });
        const snap = scratch.path('snap.qcow2');
        await r.cmd('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': snap });
        await r.cmd('blockdev-snapshot-sync', {
          'node-name': 'top',
          'snapshot-file': snap,
          'snapshot-node-name': 'top',
        });
        await r.cmd('blockdev-snapshot-sync', {
          'node-name': 'top',
          'snapshot-file': snap,
          'snapshot-node-name': 'snap',
        });
        await r.cmd('query-block-jobs');
      },
      'snap.qcow2',
    );
  });

  it('block-commit of an intermediate layer', async () => {
    const p = scratch.path.bind(scratch);
    await sideBySide(
      [
        '--blockdev',
        `driver=qcow2,node-name=base,file.driver=file,file.filename=${p('base.qcow2')}`,
        '--blockdev',
        `driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename=${p('mid.qcow2')}`,
        '--blockdev',
        `driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename=${p('top.qcow2')}`,
      ],
      async (r) => {
        await r.cmd('block-commit', {
          'job-id': 'c',
          device: 'top',
          'top-node': 'mid',
          'base-node': 'mid',
        });
        await r.cmd('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'nope' });
        await r.cmd('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', speed: 1 });
        await r.cmd('query-block-jobs', undefined, ['offset', 'busy']);
        await r.cmd('block-stream', { 'job-id': 's', device: 'top' });
        await r.cmd('block-job-set-speed', { device: 'c', speed: 0 });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('query-block-jobs');
      },
      'top.qcow2',
    );
  });

  it('block-commit of an intermediate layer with filter-node-name: a commit_top of that name for the job', async () => {
    const p = scratch.path.bind(scratch);
    await sideBySide(
      [
        '--blockdev',
        `driver=qcow2,node-name=base,file.driver=file,file.filename=${p('base.qcow2')}`,
        '--blockdev',
        `driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename=${p('mid.qcow2')}`,
        '--blockdev',
        `driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename=${p('top.qcow2')}`,
      ],
      async (r) => {
        const commit = { 'job-id': 'c', device: 'top', 'top-node': 'mid' };
        await r.cmd('block-commit', { ...commit, 'filter-node-name': 'base' });
        await r.cmd('block-commit', { ...commit, 'filter-node-name': 'cf', speed: 1 });
        // The filter holds its name while the job runs, and gives it back after.
        await r.cmd('blockdev-add', { driver: 'null-co', 'node-name': 'cf' });
        await r.cmd('blockdev-del', { 'node-name': 'cf' });
        await r.cmd('block-job-set-speed', { device: 'c', speed: 0 });
        await r.until('JOB_STATUS_CHANGE', 'null');
        await r.cmd('blockdev-add', { driver: 'null-co', 'node-name': 'cf' });
        await r.cmd('blockdev-del', { 'node-name': 'cf' });
      },
      'top.qcow2',
    );
  });

  /** The chain with each layer's file a node of its own (bf, mf, tf). */
  const fileNodeArgs = () =>
    (['base', 'mid', 'top'] as const).flatMap((n, i) => [
      '--blockdev',
      `driver=file,node-name=${n[0]}f,filename=${scratch.path(`${n}.qcow2`)}`,
      '--blockdev',
      `driver=qcow2,node-name=${n},file=${n[0]}f${i > 0 ? `,backing=${['base', 'mid'][i - 1]}` : ''}`,
    ]);

  /** What a job's nodes and their files refuse while it runs: blockdev-del and block_resize. */
  const refusals = async (r: Recorder) => {
    for (const n of ['base', 'mid', 'top', 'bf', 'mf', 'tf']) {
      await r.cmd('blockdev-del', { 'node-name': n });
    }
    for (const n of ['bf', 'mf', 'tf', 'base', 'mid', 'top']) {
      await r.cmd('block_resize', { 'node-name': n, size: 8 * MiB });
    }
  };

  it('blockdev-del and block_resize refused during a commit, in QEMU words', async () => {
    await sideBySide(
      fileNodeArgs(),
      async (r) => {
        // Without a job: not found, a backing node, a file node.
        await r.cmd('blockdev-del', { 'node-name': 'nope' });
        await r.cmd('blockdev-del', { 'node-name': 'base' });
        await r.cmd('blockdev-del', { 'node-name': 'bf' });
        await r.cmd('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', speed: 1 });
        await refusals(r);
        await r.cmd('block-job-set-speed', { device: 'c', speed: 0 });
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      'top.qcow2',
    );
  });

  it('blockdev-del and block_resize refused during a stream, in QEMU words', async () => {
    await sideBySide(
      fileNodeArgs(),
      async (r) => {
        await r.cmd('block-stream', {
          'job-id': 's',
          device: 'top',
          'base-node': 'base',
          speed: 1,
        });
        await refusals(r);
        await r.cmd('block-job-set-speed', { device: 's', speed: 0 });
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      'top.qcow2',
    );
  });

  it('a job that fails once created goes created -> null (job_early_fail), in QEMU words', async () => {
    await sideBySide(
      [
        ...topArgs(),
        '--blockdev',
        `driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename=${scratch.path('base.qcow2')}`,
      ],
      async (r) => {
        // Refused before the job exists: no event.
        await r.cmd('block-stream', { 'job-id': 'j', device: 'nope' });
        // Refused once created: the target cannot be written; the speed is checked last.
        await r.cmd('blockdev-mirror', {
          'job-id': 'm',
          device: 'top',
          target: 'ro',
          sync: 'full',
        });
        await r.cmd('block-stream', { 'job-id': 's', device: 'top', speed: -1 });
        await r.cmd('query-block-jobs');
      },
      'top.qcow2',
    );
  });

  it('a node a job uses (a mirror target) is no root: "Need a root block node"', async () => {
    for (const t of ['t0', 't1']) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path(`${t}.qcow2`), '4M']);
    }
    const node = (t: string) =>
      `driver=qcow2,node-name=${t},file.driver=file,file.filename=${scratch.path(`${t}.qcow2`)}`;
    await sideBySide(
      [...topArgs(), '--blockdev', node('t0'), '--blockdev', node('t1')],
      async (r) => {
        await r.cmd('blockdev-mirror', {
          'job-id': 'm',
          device: 'top',
          target: 't0',
          sync: 'none',
        });
        await r.cmd('blockdev-mirror', {
          'job-id': 'm2',
          device: 't0',
          target: 't1',
          sync: 'none',
        });
        await r.cmd('block-commit', { 'job-id': 'c', device: 't0' });
        await r.cmd('block-job-cancel', { device: 'm' });
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      'top.qcow2',
    );
  });
});
