// The rate limit of a block job: a stream with `speed` copies at that rate, within 10%, by
// its own accounting (query-block-jobs offsets over a run of seconds), and
// block-job-set-speed changes the rate mid-run. A mirror's zero ranges cost nothing against
// its speed where the target writes zeros by unmapping, as on qemu-storage-daemon 7.2.
import { describe, expect, it } from 'vitest';
import { run, startQsd, useScratch } from './harness/daemon.ts';
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

  it('a mirror does not charge zero ranges where the target unmaps zeros, as qemu-storage-daemon', async () => {
    // 2 MiB of data, then 30 MiB of zero clusters (allocated: dirty for sync=top). At 1 MiB/s
    // a job charged for the zeros could not be ready before 32 s.
    const src = scratch.path('src.qcow2');
    const dst = scratch.path('dst.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '32M']);
    await run('qemu-io', ['-c', 'write -P 0x5a 0 2M', '-c', 'write -z 2M 30M', src]);
    const times: Record<string, number> = {};
    for (const which of ['qsd', 'vm-disk'] as const) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', dst, '32M']);
      const qmp = scratch.path(`${which}.qmp`);
      const args = [
        ...monitorArgs(qmp),
        '--blockdev',
        `driver=qcow2,node-name=src,file.driver=file,file.filename=${src}`,
        '--blockdev',
        `driver=qcow2,node-name=dst,discard=unmap,file.driver=file,file.discard=unmap,file.filename=${dst}`,
      ];
      const p = which === 'qsd' ? await startQsd(args, qmp) : await scratch.serve(args);
      if (which === 'qsd') scratch.running.push(p);
      const r = await Recorder.open(qmp);
      const start = performance.now();
      await r.cmd('blockdev-mirror', {
        'job-id': 'm',
        device: 'src',
        target: 'dst',
        sync: 'top',
        speed: MiB,
      });
      await r.until('BLOCK_JOB_READY');
      times[which] = performance.now() - start;
      await r.cmd('block-job-cancel', { device: 'm' });
      await r.until('BLOCK_JOB_COMPLETED');
      await r.cmd('quit');
      await p.exited;
      r.client.close();
      await run('qemu-img', ['compare', src, dst]);
    }
    expect(times.qsd).toBeLessThan(16_000);
    expect(times['vm-disk']).toBeLessThan(16_000);
  }, 90_000);
});
