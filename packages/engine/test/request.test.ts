// The completion rules every backend shares (IoRequest.complete). Real files do not give
// short writes or EINTR on demand, so these drive one request by hand with completions
// and check what the next attempt asks the kernel for; the backends' own tests do the
// real I/O.
import { describe, expect, it } from 'vitest';
import { IoError } from '../src/index.ts';
import { type Backend, IoRequest, type OpKind } from '../src/request.ts';

/** Records each attempt: the position, remaining length and buffers it would submit. */
class Attempts implements Backend {
  readonly name = 'threadpool' as const;
  readonly inFlight = 0;
  readonly seen: { position: number; remaining: number; lengths: number[]; first: number[] }[] = [];
  submit(req: IoRequest): void {
    this.seen.push({
      position: req.position,
      remaining: req.remaining,
      lengths: req.bufs.map((b) => b.byteLength),
      first: req.bufs.map((b) => b[0]!),
    });
  }
  destroy(): void {}
}

function request(kind: OpKind, bufs: Uint8Array[], offset: number, align = 0) {
  const be = new Attempts();
  let result: number | Error | undefined;
  let settled = 0;
  const length = bufs.reduce((s, b) => s + b.byteLength, 0);
  const req = new IoRequest(
    be,
    kind,
    3,
    '/x',
    align,
    offset,
    bufs,
    length,
    0,
    (n) => {
      result = n;
    },
    (e) => {
      result = e;
    },
    () => {
      settled++;
    },
  );
  be.submit(req);
  return { be, req, result: () => result, settled: () => settled };
}

/** Bytes 0..n-1 so that b[0] says where a buffer starts. */
function counting(start: number, n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (start + i) % 256);
}

describe('IoRequest.complete', () => {
  it('continues a short write from where it stopped, with the remaining length smaller', () => {
    const t = request('write', [counting(0, 1000)], 4096);
    t.req.complete(300);
    t.req.complete(600);
    expect(t.be.seen.map((s) => [s.position, s.remaining, s.lengths[0], s.first[0]])).toEqual([
      [4096, 1000, 1000, 0],
      [4396, 700, 700, 300 % 256],
      [4996, 100, 100, 900 % 256],
    ]);
    expect(t.result()).toBeUndefined();
    t.req.complete(100);
    expect(t.result()).toBe(1000);
    expect(t.settled()).toBe(1);
  });

  it('continues a short vectored transfer inside and across buffers', () => {
    const t = request('writev', [counting(0, 100), counting(100, 50), counting(150, 200)], 0);
    t.req.complete(120);
    expect(t.be.seen[1]).toEqual({
      position: 120,
      remaining: 230,
      lengths: [30, 200],
      first: [120, 150],
    });
    t.req.complete(30);
    expect(t.be.seen[2]).toEqual({ position: 150, remaining: 200, lengths: [200], first: [150] });
    t.req.complete(200);
    expect(t.result()).toBe(350);
  });

  it('ends a read at EOF with the bytes read so far', () => {
    const t = request('read', [new Uint8Array(8192)], 0);
    t.req.complete(5000);
    t.req.complete(0);
    expect(t.result()).toBe(5000);
    expect(t.be.seen).toHaveLength(2);
  });

  it('ends a short unaligned O_DIRECT read at EOF instead of resubmitting it misaligned', () => {
    const t = request('read', [new Uint8Array(8192)], 0, 512);
    t.req.complete(4100);
    expect(t.result()).toBe(4100);
    expect(t.be.seen).toHaveLength(1);
  });

  it('retries EINTR, EAGAIN and ECANCELED (given as -errno), then reports other errors as IoError', () => {
    const t = request('read', [new Uint8Array(100)], 7);
    t.req.complete(-4);
    t.req.complete(-11);
    t.req.complete(-125);
    expect(t.be.seen.map((s) => s.position)).toEqual([7, 7, 7, 7]);
    t.req.complete(-5);
    const err = t.result() as IoError;
    expect(err).toBeInstanceOf(IoError);
    expect([err.errno, err.errnoName, err.syscall, err.offset, err.length]).toEqual([
      5,
      'EIO',
      'read',
      7,
      100,
    ]);
    expect(t.settled()).toBe(1);
  });

  it('a write that makes no progress is an error, not an endless loop', () => {
    const t = request('write', [new Uint8Array(100)], 0);
    t.req.complete(0);
    expect((t.result() as IoError).errnoName).toBe('EIO');
  });
});
