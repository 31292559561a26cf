// Small buffered requests that would go to io-wq anyway (req.blocks: tmpfs, ext4 writes),
// done with pread/pwrite when the io_uring backend flushes its queue: a copy in the page
// cache that small costs less than the hand-off to a kernel worker and the wake-up back.
// Their completions are delivered with the turn's others in the check phase
// (setImmediate), as a kernel completion would come through the poll: never on the
// issuer's stack, and a loop of requests that each issue the next cannot starve timers
// and sockets.

import { pread, pwrite } from './native.ts';
import type { IoRequest } from './request.ts';

/**
 * Requests up to this many bytes that would block go inline (see take()); 0: never.
 * Measured with the daemon pinned to one core: CPU per 4 KiB request on tmpfs 15-20%
 * lower. Larger copies gain from running on io-wq beside the event loop: with 64 KiB
 * inline, a backup (64 KiB clusters) ran at 0.6x its speed with them on io-wq.
 */
const INLINE_MAX = Number(process.env.VMDISK_ENGINE_INLINE_MAX ?? 16 * 1024);

export class InlineIo {
  /** Requests done inline (counted for tests and benchmarks). */
  inlineIos = 0;
  /** Requests done and their results, to be completed in the next check phase. */
  private done: (IoRequest | number)[] = [];
  private readonly deliverFn = (): void => this.deliver();

  /** Requests done but not yet completed. */
  get pending(): number {
    return this.done.length / 2;
  }

  /** Does `req` now if it qualifies (its completion comes later); false: submit it. */
  take(req: IoRequest): boolean {
    if (INLINE_MAX === 0 || !req.blocks || req.remaining > INLINE_MAX) return false;
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
