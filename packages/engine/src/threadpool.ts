// The threadpool backend: Node's callback fs API (fs.read/fs.write/fs.readv/fs.writev,
// not FileHandle, which is several times slower), each call on a libuv thread-pool
// thread; fallocate through koffi's async call (also the libuv pool). Works everywhere
// Node does. The aio backend hands it what Linux AIO cannot do asynchronously.
import * as fs from 'node:fs';
import { fallocateAsync } from './native.ts';
import type { Backend, IoRequest } from './request.ts';

/** The most one fs.read/fs.write attempt asks for (Node refuses 2 GiB and more); the rest
 * of a larger buffer is a continuation, like a short transfer. */
const MAX_ATTEMPT = 1 << 30;

function errnoOf(err: NodeJS.ErrnoException): number {
  return typeof err.errno === 'number' ? -Math.abs(err.errno) : -5;
}

export class ThreadPoolBackend implements Backend {
  readonly name = 'threadpool' as const;
  private count = 0;

  get inFlight(): number {
    return this.count;
  }

  submit(req: IoRequest): void {
    try {
      this.start(req);
    } catch (err) {
      // Node validated and refused the call: it never started.
      this.count--;
      throw err;
    }
  }

  private start(req: IoRequest): void {
    this.count++;
    const done = (err: NodeJS.ErrnoException | null, n?: number): void => {
      this.count--;
      req.complete(err ? errnoOf(err) : (n ?? 0));
    };
    const position = req.position;
    switch (req.kind) {
      case 'read': {
        const b = req.bufs[0]!;
        fs.read(req.fd, b, 0, Math.min(b.byteLength, MAX_ATTEMPT), position, done);
        break;
      }
      case 'write': {
        const b = req.bufs[0]!;
        fs.write(req.fd, b, 0, Math.min(b.byteLength, MAX_ATTEMPT), position, done);
        break;
      }
      case 'readv':
        fs.readv(req.fd, req.bufs, position, done);
        break;
      case 'writev':
        fs.writev(req.fd, req.bufs, position, done);
        break;
      case 'fsync':
        fs.fsync(req.fd, (err) => done(err));
        break;
      case 'fdatasync':
        fs.fdatasync(req.fd, (err) => done(err));
        break;
      case 'fallocate':
        void fallocateAsync(req.fd, req.mode, req.offset, req.length).then((r) => {
          this.count--;
          req.complete(Math.min(r, 0));
        });
        break;
    }
  }

  destroy(): void {}
}
