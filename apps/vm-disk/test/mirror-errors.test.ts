// blockdev-mirror's on-source-error and on-target-error (report, stop, ignore, enospc) with
// blkdebug injecting an error under the source or the target, side by side with
// qemu-storage-daemon 7.2: the same replies, BLOCK_JOB_ERROR events and job states in the
// same order (stop pauses the job, job-resume retries), and the same images after. The
// rules differ in form only, as in block-job-errors.test.ts: QEMU's fire on a driver's
// debug event, ours on a request type and range that hits the same request.
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import { bare, type Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-mirror-errors-');

/** base (0x11 at 0-1M) <- mid (0x22 at 1-2M) <- top (0x33 at 3M+512k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 1M'],
  top: ['write -P 0x33 3M 512k'],
};

type Rule = Record<string, unknown>;
type Rules = { qsd: Rule[]; ours: () => Promise<Rule[]> };

/** Where mid's own data (guest 1M, 1 MiB) is in mid.qcow2. */
async function midDataHost(): Promise<number> {
  const map = JSON.parse(
    await run('qemu-img', ['map', '--output=json', scratch.path('mid.qcow2')]),
  ) as { start: number; depth: number; offset?: number }[];
  return map.find((e) => e.start === 1 << 20 && e.depth === 0)!.offset!;
}

/** One EIO on the first read of mid's data (the source side of the mirror). */
const READ_ONCE: Rules = {
  qsd: [{ event: 'read_aio', errno: 5, once: true }],
  ours: async () => [
    { iotype: 'read', errno: 'EIO', offset: await midDataHost(), length: 1 << 20, once: true },
  ],
};

/** One error on the first write to the target's file: EIO, or ENOSPC. */
const writeOnce = (errno: 'EIO' | 'ENOSPC'): Rules => ({
  qsd: [{ event: 'write_aio', errno: errno === 'EIO' ? 5 : 28, once: true }],
  ours: async () => [{ iotype: 'write', errno, once: true }],
});

/** base <- mid <- top and a target node tgt, blkdebug with `rules` under mid's or tgt's qcow2. */
function args(on: 'mid' | 'tgt', rules: Rule[]): string[] {
  const layer = (name: string, backing?: string | null) => {
    const file = { driver: 'file', filename: scratch.path(`${name}.qcow2`) };
    return [
      '--blockdev',
      JSON.stringify({
        driver: 'qcow2',
        'node-name': name,
        ...(backing !== undefined && { backing }),
        file: name === on ? { driver: 'blkdebug', image: file, 'inject-error': rules } : file,
      }),
    ];
  };
  return [...layer('base'), ...layer('mid', 'base'), ...layer('top', 'mid'), ...layer('tgt', null)];
}

/**
 * A message without the job's progress offset. Where the error is the target's first write,
 * which copy that is (and so how much the others had done) is the order the daemon's
 * concurrent copies reach the file in, its own: QEMU's rule fires on qcow2's first data
 * write, ours on the file's first write.
 */
function withoutOffset(m: QmpMessage): QmpMessage {
  return JSON.parse(JSON.stringify(bare(m), (k, v) => (k === 'offset' ? undefined : v)));
}

/**
 * `results`: the images compared after (a job that failed leaves the target partly
 * copied, in an order that is the daemon's own: only the source is compared then).
 */
function sideBySide(
  on: 'mid' | 'tgt',
  rules: Rules,
  scenario: (r: Recorder) => Promise<void>,
  results = ['tgt.qcow2', 'top.qcow2'],
) {
  return compare(scratch, {
    prepare: async () => {
      await makeChain(scratch, CHAIN);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path('tgt.qcow2'), '4M']);
    },
    args: async (which) => args(on, which === 'qsd' ? rules.qsd : await rules.ours()),
    scenario,
    results,
    ...(on === 'tgt' && { bare: withoutOffset }),
  });
}

const mirror = (errors: Record<string, string>) => ({
  'job-id': 'm',
  device: 'top',
  target: 'tgt',
  sync: 'full',
  ...errors,
});

/** Waits for ready, completes, waits for the end. */
async function completeWhenReady(r: Recorder): Promise<void> {
  await r.until('BLOCK_JOB_READY');
  await r.cmd('block-job-complete', { device: 'm' });
  await r.until('JOB_STATUS_CHANGE', 'null');
}

describe('mirror error policies against qemu-storage-daemon 7.2', () => {
  it('on-source-error stop: pauses with BLOCK_JOB_ERROR; job-resume retries, then ready and complete', async () => {
    const seen = await sideBySide('mid', READ_ONCE, async (r) => {
      await r.cmd('blockdev-mirror', mirror({ 'on-source-error': 'stop' }));
      await r.until('JOB_STATUS_CHANGE', 'paused');
      await r.cmd('query-block-jobs');
      await r.cmd('job-resume', { id: 'm' });
      await completeWhenReady(r);
    });
    expect(seen).toContainEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 'm', operation: 'read', action: 'stop' },
    });
  });

  it('on-source-error report: the job fails with the error', async () => {
    await sideBySide(
      'mid',
      READ_ONCE,
      async (r) => {
        await r.cmd('blockdev-mirror', mirror({ 'on-source-error': 'report' }));
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      ['top.qcow2'],
    );
  });

  it('on-source-error ignore: BLOCK_JOB_ERROR, the range is copied again, ready and complete', async () => {
    const seen = await sideBySide('mid', READ_ONCE, async (r) => {
      await r.cmd('blockdev-mirror', mirror({ 'on-source-error': 'ignore' }));
      await completeWhenReady(r);
    });
    expect(seen).toContainEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 'm', operation: 'read', action: 'ignore' },
    });
  });

  it('on-target-error stop: pauses; block-job-resume retries the write', async () => {
    const seen = await sideBySide('tgt', writeOnce('EIO'), async (r) => {
      await r.cmd('blockdev-mirror', mirror({ 'on-target-error': 'stop' }));
      await r.until('JOB_STATUS_CHANGE', 'paused');
      await r.cmd('query-block-jobs');
      await r.cmd('block-job-resume', { device: 'm' });
      await completeWhenReady(r);
    });
    expect(seen).toContainEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 'm', operation: 'write', action: 'stop' },
    });
  });

  it('on-target-error enospc: ENOSPC stops the job, EIO fails it', async () => {
    await sideBySide('tgt', writeOnce('ENOSPC'), async (r) => {
      await r.cmd('blockdev-mirror', mirror({ 'on-target-error': 'enospc' }));
      await r.until('JOB_STATUS_CHANGE', 'paused');
      await r.cmd('block-job-resume', { device: 'm' });
      await completeWhenReady(r);
    });
    await sideBySide(
      'tgt',
      writeOnce('EIO'),
      async (r) => {
        await r.cmd('blockdev-mirror', mirror({ 'on-target-error': 'enospc' }));
        await r.until('JOB_STATUS_CHANGE', 'null');
      },
      ['top.qcow2'],
    );
  });
});
