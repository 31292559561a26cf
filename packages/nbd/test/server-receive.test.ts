// The server reads its sockets into one staging buffer that every read reuses
// (read-router.ts): whatever it cannot parse at the end of a read must be copied out
// before the next read overwrites it. Requests cut at any byte, many in one read, payloads
// of every size (read straight into their buffers, copied, or streamed) must land intact,
// with targets that give their own buffers and targets that do not. A payload that a read
// brought only part of is read on with the server's recv, if it has one: a recv that
// takes little at a time, or always fails, must lose nothing either.

import { afterEach, describe, expect, it } from 'vitest';
import { type ExportTarget, MemoryTarget } from '../src/index.ts';
import { Command } from '../src/protocol.ts';
import { encodeRequestHeader } from '../src/wire.ts';
import { RawNbd } from './raw-nbd.ts';
import { recv, type Started, startServer } from './server-helpers.ts';

const SIZE = 4 * 1024 * 1024;

/** A small deterministic generator (xorshift32): the same cuts on every run. */
function prng(seed: number): (n: number) => number {
  let x = seed;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

const targets: [string, () => ExportTarget][] = [
  ['without buffers of its own', () => new MemoryTarget(SIZE)],
  [
    'that gives its own buffers',
    () => {
      const m = new MemoryTarget(SIZE);
      return {
        size: () => m.size(),
        read: (o, b) => m.read(o, b),
        write: (o, b, f) => m.write(o, b, f),
        allocBuffer: (n) => new Uint8Array(n),
      };
    },
  ],
];

/** The whole disk read back in 1 MiB READs equals `model`. */
async function expectDisk(nbd: RawNbd, model: Buffer): Promise<void> {
  const MiB = 1024 * 1024;
  for (let off = 0; off < SIZE; off += MiB) {
    nbd.request({ type: Command.READ, cookie: 1000n, offset: BigInt(off), length: MiB });
    expect((await nbd.simpleReply()).error).toBe(0);
    expect((await nbd.read(MiB)).equals(model.subarray(off, off + MiB))).toBe(true);
  }
}

type Recv = ((fd: number, buf: Uint8Array) => number) | undefined;
let recvCalls = 0;
let recvBytes = 0;
const counted =
  (r: (fd: number, buf: Uint8Array) => number) =>
  (fd: number, buf: Uint8Array): number => {
    recvCalls++;
    const n = r(fd, buf);
    if (n > 0) recvBytes += n;
    return n;
  };
const EIO = -5;
const recvs: [string, Recv, boolean][] = [
  ['read on by recv', counted(recv), true],
  ['a recv that takes 1000 bytes a call', counted((fd, b) => recv(fd, b.subarray(0, 1000))), true],
  ['a recv that always fails (EIO)', counted(() => EIO), false],
  ['no recv', undefined, false],
];

describe.each(targets)('receiving requests, a target %s', (_, make) => {
  let s: Started | undefined;
  afterEach(async () => {
    await s?.server.close();
    s = undefined;
  });

  it('requests cut at random bytes land intact', async () => {
    s = await startServer([{ name: 'd', target: make(), writable: true }]);
    const { nbd } = await RawNbd.open(s.port, 'd');
    nbd.socket.setNoDelay(true);
    const rand = prng(0x5eed);
    const model = Buffer.alloc(SIZE);
    const parts: Buffer[] = [];
    const cuts: number[] = [];
    let bytes = 0;
    const COUNT = 300;
    for (let i = 0; i < COUNT; i++) {
      // Tiny and small payloads, some near the 64 KiB staging size, one streamed (> 1 MiB).
      const kind = rand(4);
      const length =
        i === 150
          ? 1536 * 1024
          : kind === 0
            ? 60_000 + rand(10_000)
            : kind === 1
              ? 1 + rand(9000)
              : 1 + rand(64);
      const offset = rand(SIZE - length);
      const payload = Buffer.alloc(length);
      for (let j = 0; j < length; j++) payload[j] = (i * 7 + j) & 0xff;
      payload.copy(model, offset);
      const h = encodeRequestHeader(false, 0, Command.WRITE, i, offset, length);
      parts.push(h, payload);
      cuts.push(bytes + 1 + rand(27));
      bytes += h.length + length;
    }
    const wire = Buffer.concat(parts);
    const replies = (async () => {
      const cookies = new Set<bigint>();
      for (let i = 0; i < COUNT; i++) {
        const r = await nbd.simpleReply();
        expect(r.error).toBe(0);
        cookies.add(r.cookie);
      }
      return cookies.size;
    })();
    // Each piece sent ends inside a request's header and is read on its own: the server
    // keeps that header's start while its next read, as long as this one or longer,
    // overwrites the staging buffer.
    let at = 0;
    for (const cut of cuts) {
      nbd.write(wire.subarray(at, cut));
      at = cut;
      await new Promise((r) => setImmediate(r));
    }
    nbd.write(wire.subarray(at));
    expect(await replies).toBe(COUNT);
    await expectDisk(nbd, model);
    nbd.destroy();
  });

  it.each(recvs)('large payloads back to back land intact, %s', async (_, r, reads) => {
    recvCalls = 0;
    recvBytes = 0;
    s = await startServer([{ name: 'd', target: make(), writable: true }], { recv: r });
    const { nbd } = await RawNbd.open(s.port, 'd');
    const rand = prng(0xb16);
    const model = Buffer.alloc(SIZE);
    const parts: Buffer[] = [];
    const COUNT = 24;
    for (let i = 0; i < COUNT; i++) {
      // 100 KiB to 1 MiB: each read straight into its buffer after the staging read.
      const length = 100 * 1024 + rand(924 * 1024 + 1);
      const offset = rand(SIZE - length);
      const payload = Buffer.alloc(length);
      for (let j = 0; j < length; j++) payload[j] = (i * 31 + j + (j >>> 9)) & 0xff;
      payload.copy(model, offset);
      const h = encodeRequestHeader(false, 0, Command.WRITE, i, offset, length);
      parts.push(h, payload);
    }
    // All at once; they land in order, so the model is what the last one left.
    nbd.write(Buffer.concat(parts));
    for (let i = 0; i < COUNT; i++) expect((await nbd.simpleReply()).error).toBe(0);
    await expectDisk(nbd, model);
    // Each payload arrives in several reads: the recv is tried after each that leaves it
    // short, and reads some when the socket has more.
    if (r !== undefined) expect(recvCalls).toBeGreaterThan(0);
    if (reads) expect(recvBytes).toBeGreaterThan(0);
    nbd.destroy();
  });
});
