// Small buffered requests that would go to io-wq anyway (req.blocks: tmpfs, ext4 writes),
// done with pread/pwrite when the io_uring backend flushes its queue: a copy in the page
// cache that small costs less than the hand-off to a kernel worker and the wake-up back.
// Their completions are delivered with the turn's others in the check phase
// (setImmediate), as a kernel completion would come through the poll: never on the
// issuer's stack, and a loop of requests that each issue the next cannot starve timers
// and sockets.

import { availableParallelism } from 'node:os';
import { pread, pwrite } from './native.ts';
import type { IoRequest } from './request.ts';

/**
 * Requests up to this many bytes that would block go inline (see take()); 0: never.
 * Measured with the daemon pinned to one core: CPU per 4 KiB request on tmpfs 15-20%
 * lower. Where more than one CPU is there, larger copies gain from running on io-wq beside
 * the event loop.
 */
const INLINE_MAX = 16 * 1024;
/**
 * The same where the process may run on one CPU only (its affinity: a daemon pinned to a
 * core, whose io-wq workers inherit the pin): a worker can never copy beside the event
 * loop there, so a hand-off costs two context switches and a wake-up for nothing. Measured
 * pinned on tmpfs: a first incremental backup (1,638 clusters of 64 KiB) 0.112-0.137 ->
 * 0.092-0.101 s, NBD 64 KiB sequential reads +4%; but 256 KiB reads -5% inline (the loop
 * takes fewer, larger batches while a worker copies), hence the bound.
 */
const INLINE_MAX_ONE_CPU = 128 * 1024;

/** The inline limit of a new engine: VMDISK_ENGINE_INLINE_MAX, else by the CPUs usable. */
function inlineMax(): number {
  const env = process.env.VMDISK_ENGINE_INLINE_MAX;
  if (env !== undefined && env !== '') return Number(env);
  return availableParallelism() === 1 ? INLINE_MAX_ONE_CPU : INLINE_MAX;
}

export class InlineIo {
  /** Requests done inline (counted for tests and benchmarks). */
  inlineIos = 0;
  /** The largest request done inline (bytes); 0: none. */
  readonly max = inlineMax();
  /** Requests done and their results, to be completed in the next check phase. */
  private done: (IoRequest | number)[] = [];
  private readonly deliverFn = (): void => this.deliver();

  /** Requests done but not yet completed. */
  get pending(): number {
    return this.done.length / 2;
  }

  /** Does `req` now if it qualifies (its completion comes later); false: submit it. */
  take(req: IoRequest): boolean {
    if (this.max === 0 || !req.blocks || req.remaining > this.max) return false;
    if ((req.kind !== 'read' && req.kind !== 'write') || req.bufs.length !== 1) return false;
    const b = req.bufs[0]!;
    this.inlineIos++;
    const res =
      req.kind === 'read' ? pread(req.fd, b, req.position) : pwrite(req.fd, b, req.position);
    this.done.push(req, res);
    if (this.done.length === 2) setImmediate(this.deliverFn);
    return true;
  }

  private deliver(): void {
    const done = this.done;
    this.done = [];
    for (let i = 0; i < done.length; i += 2) {
      (done[i] as IoRequest).complete(done[i + 1] as number);
    }
  }
}
