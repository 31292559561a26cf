// The copy loop that commit and stream share (QEMU's commit_run / stream_run).
import type { BlockJob } from './block-job.ts';

/** One chunk as its step leaves it: its length, the bytes copied, whether still reading. */
export interface Chunk {
  n: number;
  copied: number;
  /** True until the step has read its data: an error then is a read error. */
  reading: boolean;
}

/**
 * Runs `step` over [0, len) in chunks of at most `size`, each under the job's I/O. An error
 * goes by the job's on-error policy: stop pauses and retries the chunk, ignore goes on and
 * fails at the end, report fails now.
 */
export async function copyChunks(
  bj: BlockJob,
  len: number,
  size: number,
  step: (offset: number, want: number, c: Chunk) => Promise<void>,
): Promise<void> {
  const job = bj.job;
  job.progressSetRemaining(len);
  let firstError: unknown;
  let offset = 0;
  while (offset < len) {
    if (job.isCancelled) return;
    const want = Math.min(size, len - offset);
    const c: Chunk = { n: want, copied: 0, reading: true };
    try {
      await bj.io(() => step(offset, want, c));
    } catch (err) {
      const action = bj.errorAction(err, c.reading);
      if (action === 'stop') {
        await bj.afterStop();
        continue;
      }
      firstError ??= err;
      if (action === 'report') throw err;
    }
    offset += c.n;
    job.progressUpdate(c.n);
    await bj.rateLimit(c.copied);
  }
  if (firstError !== undefined) throw firstError;
}
