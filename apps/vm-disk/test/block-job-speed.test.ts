// The rate limit of a block job: a stream with `speed` copies at that rate, within 10%, by
// its own accounting (query-block-jobs offsets over a run of seconds), and
// block-job-set-speed changes the rate mid-run.
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { monitorArgs, Recorder } from './harness/qmp-recorder.ts';

const scratch = useScratch('vmdisk-block-job-speed-');
const MiB = 1 << 20;

interface Sample {
  at: number;
  offset: number;
}

async function offsetOf(r: Recorder): Promise<number> {
  const reply = await r.cmd('query-block-jobs');
  const jobs = reply.return as { offset: number }[];
  return jobs[0]!.offset;
}

/**
 * The rate over at least `windowMs`: from one change of the offset to the first change
 * after the window (both at a chunk boundary, so no partial chunk is counted).
 */
async function measure(r: Recorder, windowMs: number): Promise<number> {
  const changed = async (from: number): Promise<Sample> => {
    for (;;) {
      const offset = await offsetOf(r);
      if (offset !== from) return { at: performance.now(), offset };
    }
  };
  const a = await changed(await offsetOf(r));
  let b = a;
  while (b.at - a.at < windowMs) b = await changed(b.offset);
  return ((b.offset - a.offset) * 1000) / (b.at - a.at);
}

describe('block job speed', () => {
  it('a stream holds its speed within 10%, and set-speed changes it mid-run', async () => {
    const base = scratch.path('base.qcow2');
    const top = scratch.path('top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '48M']);
    await run('qemu-io', ['-c', 'write -P 0x5a 0 48M', base]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const qmp = scratch.path('serve.qmp');
    await scratch.serve([
      ...monitorArgs(qmp),
      '--blockdev',
      `driver=qcow2,node-name=top,file.driver=file,file.filename=${top}`,
    ]);
    const r = await Recorder.open(qmp);
    await r.cmd('block-stream', { 'job-id': 's', device: 'top', speed: 4 * MiB });
    const first = await measure(r, 2000);
    expect(Math.abs(first - 4 * MiB) / (4 * MiB)).toBeLessThan(0.1);
    await r.cmd('block-job-set-speed', { device: 's', speed: 8 * MiB });
    const second = await measure(r, 2000);
    expect(Math.abs(second - 8 * MiB) / (8 * MiB)).toBeLessThan(0.1);
    await r.cmd('block-job-set-speed', { device: 's', speed: 0 });
    await r.until('BLOCK_JOB_COMPLETED');
    r.client.close();
  }, 60_000);
});
