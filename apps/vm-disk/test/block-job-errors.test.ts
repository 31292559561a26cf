// The on-error policies of block jobs (report, ignore, stop) with blkdebug injecting EIO
// under the job, side by side with qemu-storage-daemon 7.2: the same replies and events in
// the same order, and the same images after. The rules differ in form only: QEMU's fire
// after a driver's debug event (read_aio: qcow2 reads guest data from its file), ours on
// a request type and range, here the host range of that data (qemu-img map), so that both
// fail the same request.
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-block-job-errors-');

/** base (0x11 at 0-1M) <- mid (0x22 at 1-2M) <- top (0x33 at 3M+512k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 1M'],
  top: ['write -P 0x33 3M 512k'],
};

type Rule = Record<string, unknown>;

/** base <- mid <- top as nodes, blkdebug with `rules` between `on`'s qcow2 and its file. */
function chainArgs(on: 'base' | 'mid', rules: Rule[]): string[] {
  return chainArgsOf(on, rules);
}

/** Where mid's own data (guest 1M, 1 MiB) is in mid.qcow2. */
async function midDataHost(): Promise<number> {
  const map = JSON.parse(
    await run('qemu-img', ['map', '--output=json', scratch.path('mid.qcow2')]),
  ) as { start: number; depth: number; offset?: number }[];
  return map.find((e) => e.start === 1 << 20 && e.depth === 0)!.offset!;
}

/** The same failure for each daemon: QEMU's event rule, or ours on the same request. */
type Rules = { qsd: Rule[]; ours: () => Promise<Rule[]> };

function chainArgsOf(on: 'base' | 'mid', rules: Rule[]): string[] {
  const layer = (name: string, backing?: string) => {
    const file = { driver: 'file', filename: scratch.path(`${name}.qcow2`) };
    return JSON.stringify({
      driver: 'qcow2',
      'node-name': name,
      ...(backing && { backing }),
      file: name === on ? { driver: 'blkdebug', image: file, 'inject-error': rules } : file,
    });
  };
  return [
    '--blockdev',
    layer('base'),
    '--blockdev',
    layer('mid', 'base'),
    '--blockdev',
    layer('top', 'mid'),
  ];
}

/** Runs `scenario` on a fresh chain with each daemon and compares what they did and left. */
function sideBySide(on: 'base' | 'mid', rules: Rules, scenario: (r: Recorder) => Promise<void>) {
  return compare(scratch, {
    prepare: () => makeChain(scratch, CHAIN),
    args: async (which) => chainArgs(on, which === 'qsd' ? rules.qsd : await rules.ours()),
    scenario,
    results: ['top.qcow2'],
  });
}

/** One EIO on the first read of mid's data. */
const READ_ONCE: Rules = {
  qsd: [{ event: 'read_aio', errno: 5, once: true }],
  ours: async () => [
    { iotype: 'read', errno: 'EIO', offset: await midDataHost(), length: 1 << 20, once: true },
  ],
};

/** One EIO on the first write to base's file (the commit's copy, or its allocation). */
const WRITE_ONCE: Rules = {
  qsd: [{ event: 'write_aio', errno: 5, once: true }],
  ours: async () => [{ iotype: 'write', errno: 'EIO', once: true }],
};

/**
 * An intermediate commit of mid into base. The backing file name is given: QEMU would
 * otherwise write base's json: filename (blkdebug makes it one) into top's header.
 */
const commit = (onError: string) => ({
  'job-id': 'c',
  device: 'top',
  'top-node': 'mid',
  'base-node': 'base',
  'backing-file': scratch.path('base.qcow2'),
  'on-error': onError,
});

const stream = (onError: string) => ({
  'job-id': 's',
  device: 'top',
  'base-node': 'base',
  'on-error': onError,
});

describe('block job on-error policies against qemu-storage-daemon 7.2', () => {
  it('stop: the job pauses with io-status failed and BLOCK_JOB_ERROR; resume retries and completes', async () => {
    const seen = await sideBySide('mid', READ_ONCE, async (r) => {
      await r.cmd('block-stream', stream('stop'));
      await r.until('JOB_STATUS_CHANGE', 'paused');
      await r.cmd('query-block-jobs');
      await r.cmd('block-job-resume', { device: 's' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    });
    expect(seen).toContainEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 's', operation: 'read', action: 'stop' },
    });
  });

  it('report: the job fails, BLOCK_JOB_COMPLETED carries the error, the chain stays', async () => {
    await sideBySide('mid', READ_ONCE, async (r) => {
      await r.cmd('block-stream', stream('report'));
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    });
  });

  it('ignore: the job goes on past the error, then ends failed with it', async () => {
    await sideBySide('mid', READ_ONCE, async (r) => {
      await r.cmd('block-stream', stream('ignore'));
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    });
  });

  it('commit, stop: a write to base fails, the job pauses; resume retries and completes', async () => {
    const seen = await sideBySide('base', WRITE_ONCE, async (r) => {
      await r.cmd('block-commit', commit('stop'));
      await r.until('JOB_STATUS_CHANGE', 'paused');
      await r.cmd('query-block-jobs');
      await r.cmd('block-job-resume', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    });
    expect(seen).toContainEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 'c', operation: 'write', action: 'stop' },
    });
  });

  it('commit, report: the job fails with EIO, the chain stays', async () => {
    await sideBySide('base', WRITE_ONCE, async (r) => {
      await r.cmd('block-commit', commit('report'));
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    });
  });
});
