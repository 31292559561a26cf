// READs and WRITEs larger than the 1 MiB piece are streamed: the bytes on the wire are
// those of a whole reply (simple, one DF chunk, or data and hole chunks), a failure is
// answered as the spec allows at that point, and the memory budget holds: clients that
// never read their replies pin a bounded amount while another client is served.
import { afterEach, describe, expect, it } from 'vitest';
import { type ExportTarget, MemoryTarget, NbdClient } from '../src/index.ts';
import { Command, CommandFlag, WireError } from '../src/protocol.ts';
import { RawNbd, replyError } from './raw-nbd.ts';
import { type Started, startServer, until } from './server-helpers.ts';

const MiB = 1024 * 1024;

/** A target whose bytes are a function of their offset, with one hole at 3..4 MiB. */
async function patterned(size: number): Promise<MemoryTarget> {
  const t = new MemoryTarget(size);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE(i >>> 0, i);
  await t.write(0, b.subarray(0, 3 * MiB), {});
  await t.write(4 * MiB, b.subarray(4 * MiB), {});
  return t;
}

function expected(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const at = offset + i;
    b[i] = at >= 3 * MiB && at < 4 * MiB ? 0 : ((at & ~3) >>> (8 * (at & 3))) & 0xff;
  }
  return b;
}

let started: Started[] = [];
afterEach(async () => {
  await Promise.all(started.map((s) => s.server.close()));
  started = [];
});

async function serve(target: ExportTarget, options = {}): Promise<Started> {
  const s = await startServer(
    [{ name: 'd', target, writable: target.write !== undefined }],
    options,
  );
  started.push(s);
  return s;
}

describe('streamed READ', () => {
  const OFFSET = 512 * 1024 + 4096;
  const LENGTH = 6 * MiB + 8192;

  it('simple replies: one header, then all the data', async () => {
    const s = await serve(await patterned(8 * MiB));
    const { nbd } = await RawNbd.open(s.port, 'd');
    nbd.request({ type: Command.READ, cookie: 5n, offset: BigInt(OFFSET), length: LENGTH });
    expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 5n });
    expect((await nbd.read(LENGTH)).equals(expected(OFFSET, LENGTH))).toBe(true);
    // And the connection goes on.
    nbd.request({ type: Command.READ, cookie: 6n, offset: 0n, length: 4096 });
    expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 6n });
    expect((await nbd.read(4096)).equals(expected(0, 4096))).toBe(true);
    nbd.destroy();
  });

  it('structured replies: data chunks of at most 1 MiB and the hole, the last one DONE', async () => {
    for (const extended of [false, true]) {
      const s = await serve(await patterned(8 * MiB));
      const { nbd } = await RawNbd.open(s.port, 'd', { structured: true, extended });
      nbd.request({ type: Command.READ, cookie: 7n, offset: BigInt(OFFSET), length: LENGTH });
      const msgs = await nbd.reply();
      expect(replyError(msgs)).toBe(0);
      const got = Buffer.alloc(LENGTH);
      let holes = 0;
      for (const [i, m] of msgs.entries()) {
        expect(m.cookie).toBe(7n);
        expect((m.flags & 1) !== 0).toBe(i === msgs.length - 1);
        const at = Number(m.payload.readBigUInt64BE(0)) - OFFSET;
        if (m.type === 1) {
          expect(m.payload.length - 8).toBeLessThanOrEqual(MiB);
          m.payload.subarray(8).copy(got, at);
        } else {
          expect(m.type).toBe(2);
          expect([at + OFFSET, m.payload.readUInt32BE(8)]).toEqual([3 * MiB, MiB]);
          holes++;
        }
      }
      expect(holes).toBe(1);
      expect(got.equals(expected(OFFSET, LENGTH))).toBe(true);
      nbd.destroy();
    }
  });

  it('DF: one OFFSET_DATA chunk for the whole read', async () => {
    const s = await serve(await patterned(8 * MiB));
    const { nbd } = await RawNbd.open(s.port, 'd', { structured: true });
    nbd.request({
      type: Command.READ,
      flags: CommandFlag.DF,
      cookie: 8n,
      offset: BigInt(OFFSET),
      length: LENGTH,
    });
    const msgs = await nbd.reply();
    expect(msgs.map((m) => [m.type, m.flags, m.payload.length])).toEqual([[1, 1, 8 + LENGTH]]);
    expect(msgs[0]!.payload.subarray(8).equals(expected(OFFSET, LENGTH))).toBe(true);
    nbd.destroy();
  });

  it('a failure: an error reply before anything went out, an ERROR chunk after data, a disconnect after a simple header', async () => {
    const backing = await patterned(8 * MiB);
    let failAt = -1;
    const failing: ExportTarget = {
      size: () => backing.size(),
      read: async (o, b) => {
        if (o <= failAt && failAt < o + b.length) {
          throw Object.assign(new Error('bad sector'), { errnoName: 'EIO' });
        }
        await backing.read(o, b);
      },
    };
    const s = await serve(failing);
    // The first piece fails: a plain error reply, the connection stays.
    failAt = 0;
    const simple = (await RawNbd.open(s.port, 'd')).nbd;
    simple.request({ type: Command.READ, cookie: 1n, offset: 0n, length: 4 * MiB });
    expect(await simple.simpleReply()).toEqual({ error: WireError.EIO, cookie: 1n });
    // A later piece fails: the data went out with its header, so the client must go.
    failAt = 3 * MiB;
    simple.request({ type: Command.READ, cookie: 2n, offset: 0n, length: 4 * MiB });
    expect(await simple.simpleReply()).toEqual({ error: 0, cookie: 2n });
    expect(await simple.closedWithin()).toBe(true);
    // Structured: the data chunks, then an ERROR chunk; the connection stays.
    const structured = (await RawNbd.open(s.port, 'd', { structured: true })).nbd;
    structured.request({ type: Command.READ, cookie: 3n, offset: 0n, length: 4 * MiB });
    const msgs = await structured.reply();
    expect(msgs.map((m) => m.type)).toEqual([1, 1, 1, 0x8001]);
    expect(replyError(msgs)).toBe(WireError.EIO);
    structured.request({ type: Command.READ, cookie: 4n, offset: 0n, length: 4096 });
    expect(replyError(await structured.reply())).toBe(0);
    structured.destroy();
    await until('the failed reads to be over', () => s.server.exportStats('d').inFlight === 0);
    expect(s.server.requestMemory.inUse).toBe(0);
  });
});

describe('streamed WRITE', () => {
  it('takes the payload in pieces and writes it all; FUA is a flush after them', async () => {
    const backing = new MemoryTarget(16 * MiB);
    const calls: string[] = [];
    const target: ExportTarget = {
      size: () => backing.size(),
      read: (o, b) => backing.read(o, b),
      write: async (o, b, f) => {
        calls.push(`write ${b.length}${f.fua ? ' fua' : ''}`);
        await backing.write(o, b, {});
      },
      flush: async () => {
        calls.push('flush');
      },
    };
    const s = await serve(target);
    const client = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/d`);
    const data = expected(0, 5 * MiB + 4096);
    await client.write(8192, data, { fua: true });
    expect(calls).toEqual([...Array(5).fill(`write ${MiB}`), 'write 4096', 'flush']);
    const back = Buffer.alloc(data.length);
    await backing.read(8192, back);
    expect(back.equals(data)).toBe(true);
    await client.close();
  });

  it('a piece that fails: the rest of the payload is dropped, EIO answered, the connection in sync', async () => {
    const backing = new MemoryTarget(16 * MiB);
    const target: ExportTarget = {
      size: () => backing.size(),
      read: (o, b) => backing.read(o, b),
      write: async (o, b) => {
        if (o >= 2 * MiB) throw Object.assign(new Error('no space'), { errnoName: 'ENOSPC' });
        await backing.write(o, b, {});
      },
    };
    const s = await serve(target);
    const { nbd } = await RawNbd.open(s.port, 'd');
    const payload = Buffer.alloc(6 * MiB, 0x3c);
    nbd.request({ type: Command.WRITE, cookie: 1n, offset: 0n, length: payload.length, payload });
    expect(await nbd.simpleReply()).toEqual({ error: WireError.ENOSPC, cookie: 1n });
    nbd.request({ type: Command.READ, cookie: 2n, offset: 0n, length: 4096 });
    expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 2n });
    expect((await nbd.read(4096)).every((b) => b === 0x3c)).toBe(true);
    nbd.destroy();
  });

  it('a client that hangs up mid-payload: what it sent is written or dropped, nothing is left held', async () => {
    const backing = new MemoryTarget(16 * MiB);
    const s = await serve(backing);
    const { nbd } = await RawNbd.open(s.port, 'd');
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(Command.WRITE, 6);
    h.writeUInt32BE(6 * MiB, 24);
    nbd.write(Buffer.concat([h, Buffer.alloc(MiB + MiB / 2, 7)]));
    await until('the first piece to be written', async () => {
      const b = Buffer.alloc(1);
      await backing.read(MiB - 1, b);
      return b[0] === 7;
    });
    nbd.destroy();
    await until('the connection to be gone', () => s.server.connectionCount === 0);
    expect(s.server.requestMemory.inUse).toBe(0);
    expect(s.server.exportStats('d').inFlight).toBe(0);
  });
});

describe('the memory budget', () => {
  it('clients that never read their 32 MiB replies hold a bounded share; another client is served; all of it comes back', async () => {
    const s = await serve(new MemoryTarget(64 * MiB), { requestMemoryBudget: 64 * MiB });
    let peak = 0;
    const sample = setInterval(() => {
      peak = Math.max(peak, s.server.requestMemory.inUse);
    }, 5);
    const stuck: RawNbd[] = [];
    for (let i = 0; i < 16; i++) {
      const { nbd } = await RawNbd.open(s.port, 'd');
      nbd.socket.pause();
      for (let k = 0; k < 4; k++) {
        nbd.request({ type: Command.READ, cookie: BigInt(k), offset: 0n, length: 32 * MiB });
      }
      stuck.push(nbd);
    }
    // Each holds two 1 MiB pieces of its first reply, its 2 MiB share (the kernel holds
    // what it took of its socket; its other reads wait).
    await until(
      'the stuck clients to hold 2 MiB each',
      () => s.server.requestMemory.inUse === 32 * MiB,
    );
    // Another client's reads and writes go through meanwhile.
    const other = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/d`);
    await other.write(0, Buffer.alloc(65536, 9));
    expect((await other.read(0, 65536)).every((b) => b === 9)).toBe(true);
    await other.close();
    clearInterval(sample);
    // 2 GiB were asked for and never read.
    expect(peak).toBeLessThanOrEqual(32 * MiB + 65536);
    for (const nbd of stuck) nbd.destroy();
    await until('the stuck clients to be gone', () => s.server.connectionCount === 0);
    expect(s.server.requestMemory).toEqual({ budget: 64 * MiB, inUse: 0 });
  });

  it('a request larger than the whole budget still completes when alone', async () => {
    const s = await serve(await patterned(8 * MiB), { requestMemoryBudget: 256 * 1024 });
    const client = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/d`);
    expect(Buffer.from(await client.read(0, 6 * MiB)).equals(expected(0, 6 * MiB))).toBe(true);
    await client.write(0, Buffer.alloc(2 * MiB, 1));
    expect((await client.read(MiB, 4096)).every((b) => b === 1)).toBe(true);
    await client.close();
  });
});
