// The server against a raw-socket client: negotiation, transmission, structured and
// extended replies, block status, and every bad input of docs/nbd.md's "Rules that
// servers get wrong", each followed by a check that the server still serves.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ErrorEvent, type ExportTarget, MemoryTarget, NbdServer } from '../src/index.ts';
import {
  ChunkType,
  Command,
  CommandFlag,
  Info,
  Option,
  OptionReply,
  TransmissionFlag,
  WireError,
} from '../src/protocol.ts';
import { RawNbd, replyError } from './raw-nbd.ts';
import { type Started, startServer, stillServes, tempDir, until } from './server-helpers.ts';

const SIZE = 4 * 1024 * 1024;
const pattern = (n: number, seed: number): Buffer => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
};

/** A 1 MiB target whose reads wait for open(); it counts the reads started and finished. */
function gatedTarget(): {
  target: ExportTarget;
  open(): void;
  readonly started: number;
  readonly finished: number;
} {
  const backing = new MemoryTarget(1 << 20);
  let open!: () => void;
  const gate = new Promise<void>((resolve) => {
    open = resolve;
  });
  let started = 0;
  let finished = 0;
  return {
    target: {
      size: () => backing.size(),
      read: async (o, b) => {
        started++;
        await gate;
        await backing.read(o, b);
        finished++;
      },
    },
    open: () => open(),
    get started() {
      return started;
    },
    get finished() {
      return finished;
    },
  };
}

describe('NbdServer over a raw socket', () => {
  let s: Started;
  let mem: MemoryTarget;
  const errors: ErrorEvent[] = [];

  beforeAll(async () => {
    mem = new MemoryTarget(SIZE);
    await mem.write(0, pattern(4096, 1), {});
    s = await startServer([
      { name: 'disk', description: 'the test disk', target: mem, writable: true },
      { name: 'ro', target: new MemoryTarget(SIZE), writable: false },
    ]);
    s.server.on('error', (e) => errors.push(e));
  });
  afterAll(async () => {
    await s.server.close();
  });

  describe('negotiation', () => {
    it('lists exports with descriptions, then ACK', async () => {
      const nbd = await RawNbd.connect(s.port);
      const flags = await nbd.handshake();
      expect(flags & 3).toBe(3);
      nbd.sendOption(Option.LIST);
      const replies = await nbd.optionReplies();
      expect(replies.map((r) => r.type)).toEqual([
        OptionReply.SERVER,
        OptionReply.SERVER,
        OptionReply.ACK,
      ]);
      const first = replies[0]!.data;
      const nameLen = first.readUInt32BE(0);
      expect(first.subarray(4, 4 + nameLen).toString()).toBe('disk');
      expect(first.subarray(4 + nameLen).toString()).toBe('the test disk');
      nbd.destroy();
    });

    it('answers INFO with name, description, block size and export info, and stays in negotiation', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      nbd.sendOption(
        Option.INFO,
        RawNbd.goData('disk', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]),
      );
      const replies = await nbd.optionReplies();
      const byInfo = new Map(
        replies
          .filter((r) => r.type === OptionReply.INFO)
          .map((r) => [r.data.readUInt16BE(0), r.data]),
      );
      expect(byInfo.get(Info.NAME)!.subarray(2).toString()).toBe('disk');
      expect(byInfo.get(Info.DESCRIPTION)!.subarray(2).toString()).toBe('the test disk');
      const bs = byInfo.get(Info.BLOCK_SIZE)!;
      expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([
        1,
        4096,
        32 * 1024 * 1024,
      ]);
      const ex = byInfo.get(Info.EXPORT)!;
      expect(ex.readBigUInt64BE(2)).toBe(BigInt(SIZE));
      expect(replies[replies.length - 1]!.type).toBe(OptionReply.ACK);
      // Still negotiating: an unknown export gets ERR_UNKNOWN, an unknown option ERR_UNSUP.
      expect(await nbd.simpleOption(Option.GO, RawNbd.goData('nope'))).toBe(
        OptionReply.ERR_UNKNOWN,
      );
      expect(await nbd.simpleOption(99, Buffer.from('whatever'))).toBe(OptionReply.ERR_UNSUP);
      expect(await nbd.simpleOption(Option.STARTTLS)).toBe(OptionReply.ERR_POLICY);
      expect(await nbd.simpleOption(Option.LIST, Buffer.from('x'))).toBe(OptionReply.ERR_INVALID);
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY, Buffer.from('x'))).toBe(
        OptionReply.ERR_INVALID,
      );
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ACK);
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ERR_INVALID);
      // A GO whose name length overruns the option, and one with a bad info count.
      const bad = RawNbd.goData('disk');
      bad.writeUInt32BE(1000, 0);
      expect(await nbd.simpleOption(Option.GO, bad)).toBe(OptionReply.ERR_INVALID);
      const badCount = RawNbd.goData('disk', [1]);
      badCount.writeUInt16BE(5, 8);
      expect(await nbd.simpleOption(Option.GO, badCount)).toBe(OptionReply.ERR_INVALID);
      const replies2 = await nbd.go('disk');
      expect(replies2[replies2.length - 1]!.type).toBe(OptionReply.ACK);
      nbd.destroy();
    });

    it('advertises transmission flags from the export and the target', async () => {
      const rw = await RawNbd.open(s.port, 'disk', { structured: true });
      const F = TransmissionFlag;
      for (const f of [
        F.HAS_FLAGS,
        F.SEND_FLUSH,
        F.SEND_FUA,
        F.SEND_TRIM,
        F.SEND_WRITE_ZEROES,
        F.SEND_DF,
        F.CAN_MULTI_CONN,
        F.SEND_FAST_ZERO,
      ]) {
        expect(rw.flags & f).toBe(f);
      }
      expect(rw.flags & (F.READ_ONLY | F.SEND_CACHE)).toBe(0);
      rw.nbd.destroy();
      const ro = await RawNbd.open(s.port, 'ro');
      expect(ro.flags & F.READ_ONLY).toBe(F.READ_ONLY);
      expect(ro.flags & (F.SEND_DF | F.SEND_TRIM | F.SEND_WRITE_ZEROES)).toBe(0);
      ro.nbd.destroy();
    });

    it('serves EXPORT_NAME (with and without the 124 zero bytes)', async () => {
      for (const clientFlags of [1, 3]) {
        const nbd = await RawNbd.connect(s.port);
        await nbd.handshake(clientFlags);
        nbd.sendOption(Option.EXPORT_NAME, Buffer.from('disk'));
        const r = await nbd.read(clientFlags === 3 ? 10 : 134);
        expect(r.readBigUInt64BE(0)).toBe(BigInt(SIZE));
        if (clientFlags === 1) expect(r.subarray(10).every((b) => b === 0)).toBe(true);
        nbd.request({ type: Command.READ, cookie: 5n, offset: 0n, length: 4096 });
        const rep = await nbd.simpleReply();
        expect(rep).toEqual({ error: 0, cookie: 5n });
        expect((await nbd.read(4096)).equals(pattern(4096, 1))).toBe(true);
        nbd.destroy();
      }
    });

    it('serves the default export to a client asking for ""', async () => {
      const server = new NbdServer({ defaultExport: 'b' });
      server.addExport({ name: 'a', target: new MemoryTarget(4096) });
      server.addExport({ name: 'b', target: new MemoryTarget(8192) });
      const addr = await server.listen({ port: 0 });
      const port = (addr as { port: number }).port;
      const { nbd, size } = await RawNbd.open(port, '');
      expect(size).toBe(8192n);
      nbd.destroy();
      await server.close();
    });

    it('does not touch a target before a client chooses its export', async () => {
      const backing = new MemoryTarget(65536);
      const calls: string[] = [];
      const watched: ExportTarget = {
        size: () => {
          calls.push('size');
          return backing.size();
        },
        read: (o, b) => {
          calls.push('read');
          return backing.read(o, b);
        },
      };
      s.server.addExport({ name: 'watched', target: watched });
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      nbd.sendOption(Option.LIST);
      await nbd.optionReplies();
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ACK);
      nbd.sendOption(Option.LIST_META_CONTEXT, RawNbd.metaData('watched', []));
      await nbd.optionReplies();
      expect(calls).toEqual([]);
      expect((await nbd.go('watched')).pop()!.type).toBe(OptionReply.ACK);
      expect(calls).toContain('size');
      nbd.destroy();
      await s.server.removeExport('watched', 'hard');
    });

    it('ABORT gets an ACK and the connection closes', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      expect(await nbd.simpleOption(Option.ABORT)).toBe(OptionReply.ACK);
      expect(await nbd.closedWithin()).toBe(true);
    });

    it('lists and sets meta contexts; GO on another export drops them', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      // SET before structured replies: refused.
      expect(
        await nbd.simpleOption(
          Option.SET_META_CONTEXT,
          RawNbd.metaData('disk', ['base:allocation']),
        ),
      ).toBe(OptionReply.ERR_INVALID);
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ACK);
      /** The names LIST_META_CONTEXT answers for `queries` on "disk". */
      const list = async (queries: string[]) => {
        nbd.sendOption(Option.LIST_META_CONTEXT, RawNbd.metaData('disk', queries));
        return (await nbd.optionReplies())
          .filter((r) => r.type === OptionReply.META_CONTEXT)
          .map((r) => r.data.subarray(4).toString());
      };
      expect(await list([])).toEqual(['base:allocation']);
      expect(await list(['qemu:allocation-depth', 'base:'])).toEqual(['base:allocation']);
      expect(
        await nbd.simpleOption(
          Option.SET_META_CONTEXT,
          RawNbd.metaData('nope', ['base:allocation']),
        ),
      ).toBe(OptionReply.ERR_UNKNOWN);
      const truncated = RawNbd.metaData('disk', ['base:allocation']).subarray(0, 20);
      expect(await nbd.simpleOption(Option.SET_META_CONTEXT, truncated)).toBe(
        OptionReply.ERR_INVALID,
      );
      nbd.sendOption(Option.SET_META_CONTEXT, RawNbd.metaData('ro', ['base:allocation']));
      const set = await nbd.optionReplies();
      expect(set[0]!.type).toBe(OptionReply.META_CONTEXT);
      expect(set[0]!.data.readUInt32BE(0)).toBeGreaterThan(0);
      // GO on "disk": the context was chosen for "ro", so block status has none.
      expect((await nbd.go('disk')).pop()!.type).toBe(OptionReply.ACK);
      nbd.request({ type: Command.BLOCK_STATUS, cookie: 1n, offset: 0n, length: 4096 });
      expect(replyError(await nbd.reply())).toBe(WireError.EINVAL);
      nbd.destroy();
    });

    it('offers qemu:allocation-depth only for targets that report depth', async () => {
      const base = new MemoryTarget(1 << 20);
      await base.write(0, Buffer.alloc(65536, 1), {});
      const deep: ExportTarget = {
        size: () => base.size(),
        read: (o, b) => base.read(o, b),
        reportsDepth: true,
        blockStatus: async (o, l) =>
          (await base.blockStatus(o, l)).map((e) => ({ ...e, depth: e.hole ? 0 : 2 })),
      };
      s.server.addExport({ name: 'deep', target: deep });
      const { nbd, contexts } = await RawNbd.open(s.port, 'deep', {
        structured: true,
        meta: ['base:allocation', 'qemu:allocation-depth'],
      });
      expect([...contexts.keys()].sort()).toEqual(['base:allocation', 'qemu:allocation-depth']);
      nbd.request({ type: Command.BLOCK_STATUS, cookie: 9n, offset: 0n, length: 1 << 20 });
      const msgs = await nbd.reply();
      const byId = new Map(msgs.map((m) => [m.payload.readUInt32BE(0), m.payload]));
      const depth = byId.get(contexts.get('qemu:allocation-depth')!)!;
      expect([
        depth.readUInt32BE(4),
        depth.readUInt32BE(8),
        depth.readUInt32BE(12),
        depth.readUInt32BE(16),
      ]).toEqual([65536, 2, (1 << 20) - 65536, 0]);
      nbd.destroy();
      await s.server.removeExport('deep', 'hard');
    });
  });

  describe('transmission', () => {
    it('writes, reads, flushes, trims and zeroes with simple replies', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk');
      const data = pattern(65536, 7);
      nbd.request({
        type: Command.WRITE,
        flags: CommandFlag.FUA,
        cookie: 1n,
        offset: 131072n,
        length: data.length,
        payload: data,
      });
      expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 1n });
      nbd.request({ type: Command.READ, cookie: 2n, offset: 131072n, length: data.length });
      expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 2n });
      expect((await nbd.read(data.length)).equals(data)).toBe(true);
      nbd.request({ type: Command.FLUSH, cookie: 3n, length: 0 });
      expect((await nbd.simpleReply()).error).toBe(0);
      nbd.request({ type: Command.TRIM, cookie: 4n, offset: 131072n, length: 65536 });
      expect((await nbd.simpleReply()).error).toBe(0);
      nbd.request({
        type: Command.WRITE_ZEROES,
        flags: CommandFlag.NO_HOLE,
        cookie: 5n,
        offset: 0n,
        length: 512,
      });
      expect((await nbd.simpleReply()).error).toBe(0);
      const back = Buffer.alloc(512);
      await mem.read(0, back);
      expect(back.every((b) => b === 0)).toBe(true);
      await mem.write(0, pattern(4096, 1), {});
      const stats = s.server.exportStats('disk');
      expect(stats.bytesWritten).toBeGreaterThanOrEqual(65536);
      expect(stats.inFlight).toBe(0);
      nbd.destroy();
    });

    it('sends sparse reads as OFFSET_DATA and OFFSET_HOLE chunks, and DF reads as one chunk', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk', { structured: true });
      // [0, 4096) holds data, [64K, 128K) was never written.
      nbd.request({ type: Command.READ, cookie: 11n, offset: 0n, length: 131072 });
      const msgs = await nbd.reply();
      expect(msgs.map((m) => m.type)).toEqual([ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE]);
      expect(msgs[0]!.payload.readBigUInt64BE(0)).toBe(0n);
      expect(msgs[0]!.payload.subarray(8, 8 + 4096).equals(pattern(4096, 1))).toBe(true);
      expect(msgs[1]!.payload.readBigUInt64BE(0)).toBe(65536n);
      expect(msgs[1]!.payload.readUInt32BE(8)).toBe(65536);
      expect(msgs[1]!.flags & 1).toBe(1);
      nbd.request({
        type: Command.READ,
        flags: CommandFlag.DF,
        cookie: 12n,
        offset: 0n,
        length: 131072,
      });
      const df = await nbd.reply();
      expect(df.map((m) => m.type)).toEqual([ChunkType.OFFSET_DATA]);
      expect(df[0]!.payload.length).toBe(8 + 131072);
      nbd.destroy();
    });

    it('answers block status from the target allocation, with REQ_ONE giving one extent', async () => {
      const { nbd, contexts } = await RawNbd.open(s.port, 'disk', {
        structured: true,
        meta: ['base:allocation'],
      });
      const id = contexts.get('base:allocation')!;
      nbd.request({ type: Command.BLOCK_STATUS, cookie: 21n, offset: 0n, length: 1 << 20 });
      const [m] = await nbd.reply();
      expect(m!.type).toBe(ChunkType.BLOCK_STATUS);
      expect(m!.payload.readUInt32BE(0)).toBe(id);
      // First 64 KiB chunk allocated (data), the rest a hole that reads as zeros.
      expect([
        m!.payload.readUInt32BE(4),
        m!.payload.readUInt32BE(8),
        m!.payload.readUInt32BE(12),
        m!.payload.readUInt32BE(16),
      ]).toEqual([65536, 0, (1 << 20) - 65536, 3]);
      nbd.request({
        type: Command.BLOCK_STATUS,
        flags: CommandFlag.REQ_ONE,
        cookie: 22n,
        offset: 65536n,
        length: 4096,
      });
      const [one] = await nbd.reply();
      expect(one!.payload.length).toBe(12);
      expect([one!.payload.readUInt32BE(4), one!.payload.readUInt32BE(8)]).toEqual([4096, 3]);
      nbd.destroy();
    });

    it('speaks extended headers: 64-bit requests, extended replies, BLOCK_STATUS_EXT', async () => {
      const { nbd, contexts, flags } = await RawNbd.open(s.port, 'disk', {
        extended: true,
        meta: ['base:allocation'],
      });
      expect(flags & TransmissionFlag.SEND_DF).toBe(TransmissionFlag.SEND_DF);
      const data = pattern(8192, 3);
      nbd.request({
        type: Command.WRITE,
        cookie: 31n,
        offset: 1048576n,
        length: data.length,
        payload: data,
      });
      const w = await nbd.reply();
      expect(w.map((m) => [m.type, m.flags, m.cookie, m.offset])).toEqual([
        [ChunkType.NONE, 1, 31n, 1048576n],
      ]);
      nbd.request({
        type: Command.READ,
        flags: CommandFlag.DF,
        cookie: 32n,
        offset: 1048576n,
        length: 8192,
      });
      const r = await nbd.reply();
      expect(r[0]!.type).toBe(ChunkType.OFFSET_DATA);
      expect(r[0]!.payload.subarray(8).equals(data)).toBe(true);
      nbd.request({ type: Command.BLOCK_STATUS, cookie: 33n, offset: 1048576n, length: 131072 });
      const [bs] = await nbd.reply();
      expect(bs!.type).toBe(ChunkType.BLOCK_STATUS_EXT);
      expect(bs!.payload.readUInt32BE(0)).toBe(contexts.get('base:allocation'));
      expect(bs!.payload.readUInt32BE(4)).toBe(2);
      expect(bs!.payload.readBigUInt64BE(8)).toBe(65536n);
      expect(bs!.payload.readBigUInt64BE(16)).toBe(0n);
      // A 64-bit length far beyond the export: EINVAL, as an extended error chunk.
      nbd.request({ type: Command.TRIM, cookie: 34n, offset: 0n, length: 1n << 40n });
      expect(replyError(await nbd.reply())).toBe(WireError.EINVAL);
      nbd.destroy();
    });

    it('keeps many requests in flight and never interleaves replies', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk', { structured: true });
      const lengths = [512, 4096, 65536, 300000, 1, 131072];
      for (let i = 0; i < 60; i++) {
        nbd.request({
          type: Command.READ,
          flags: CommandFlag.DF,
          cookie: BigInt(1000 + i),
          offset: BigInt(i * 997),
          length: lengths[i % lengths.length]!,
        });
      }
      const seen = new Set<bigint>();
      while (seen.size < 60) {
        const m = await nbd.message();
        expect(m.type).toBe(ChunkType.OFFSET_DATA);
        const i = Number(m.cookie - 1000n);
        expect(m.payload.length).toBe(8 + lengths[i % lengths.length]!);
        const expected = Buffer.alloc(lengths[i % lengths.length]!);
        await mem.read(i * 997, expected);
        expect(m.payload.subarray(8).equals(expected)).toBe(true);
        seen.add(m.cookie);
      }
      nbd.destroy();
    });

    it('DISC finishes what is in flight, then closes without a reply', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk');
      const data = pattern(4096, 9);
      nbd.request({
        type: Command.WRITE,
        cookie: 41n,
        offset: 200704n,
        length: 4096,
        payload: data,
      });
      nbd.request({ type: Command.DISC, cookie: 42n, length: 0 });
      expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 41n });
      expect(await nbd.closedWithin()).toBe(true);
      const back = Buffer.alloc(4096);
      await mem.read(200704, back);
      expect(back.equals(data)).toBe(true);
    });
  });

  describe('bad input (each followed by a check that the server still serves)', () => {
    const expectServing = async (): Promise<void> => {
      expect((await stillServes(s.port, 'disk')).equals(pattern(4096, 1))).toBe(true);
    };

    it('drops a client with unknown client flags', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake(0x80);
      expect(await nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('drops a client whose option claims 4 GiB (no allocation), and one just over the limit', async () => {
      for (const len of [0xffffffff, 64 * 1024 + 1]) {
        const nbd = await RawNbd.connect(s.port);
        await nbd.handshake();
        nbd.sendOption(Option.GO, Buffer.alloc(0), len);
        expect(await nbd.closedWithin()).toBe(true);
      }
      expect(errors.some((e) => /claims 4294967295 bytes/.test(e.error.message))).toBe(true);
      await expectServing();
    });

    it('drops a client with a bad option magic', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      nbd.write(Buffer.alloc(16, 0x41));
      expect(await nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('ends the session on EXPORT_NAME of an unknown export, or of an oversized name', async () => {
      for (const name of [Buffer.from('missing'), Buffer.alloc(5000, 0x61)]) {
        const nbd = await RawNbd.connect(s.port);
        await nbd.handshake();
        nbd.sendOption(Option.EXPORT_NAME, name);
        expect(await nbd.closedWithin()).toBe(true);
      }
      await expectServing();
    });

    it('drops a client that sends EXPORT_NAME after negotiating extended headers', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      expect(await nbd.simpleOption(Option.EXTENDED_HEADERS)).toBe(OptionReply.ACK);
      expect(await nbd.simpleOption(Option.EXTENDED_HEADERS)).toBe(OptionReply.ERR_INVALID);
      expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ERR_EXT_HEADER_REQD);
      nbd.sendOption(Option.EXPORT_NAME, Buffer.from('disk'));
      expect(await nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('drops a non-fixed-newstyle client that sends another option', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake(0);
      nbd.sendOption(Option.LIST);
      expect(await nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('refuses out-of-bounds requests without overflow near 2^64', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk');
      const cases: Array<[number, bigint, number, number]> = [
        [Command.READ, BigInt(SIZE) + 1n, 1, WireError.EINVAL],
        [Command.READ, 0xffffffffffffff00n, 0x200, WireError.EINVAL],
        [Command.READ, BigInt(SIZE) - 100n, 101, WireError.EINVAL],
        [Command.TRIM, 0xfffffffffffffffen, 4, WireError.EINVAL],
        [Command.WRITE_ZEROES, BigInt(SIZE), 1, WireError.ENOSPC],
        [Command.CACHE, 0n, 1, WireError.EINVAL], // not advertised
        [Command.BLOCK_STATUS, 0n, 1, WireError.EINVAL], // no context selected
        [Command.RESIZE, 0n, 0, WireError.EINVAL],
        [77, 0n, 0, WireError.EINVAL],
      ];
      let cookie = 100n;
      for (const [type, offset, length, errno] of cases) {
        nbd.request({ type, cookie: ++cookie, offset, length });
        expect(await nbd.simpleReply(), `command ${type} at ${offset}`).toEqual({
          error: errno,
          cookie,
        });
      }
      // Unknown flags, and DF without structured replies.
      nbd.request({ type: Command.FLUSH, flags: 0x8000, cookie: 200n, length: 0 });
      expect((await nbd.simpleReply()).error).toBe(WireError.EINVAL);
      nbd.request({ type: Command.READ, flags: CommandFlag.DF, cookie: 201n, length: 1 });
      expect((await nbd.simpleReply()).error).toBe(WireError.EINVAL);
      nbd.request({ type: Command.READ, cookie: 202n, length: 4096 });
      expect((await nbd.simpleReply()).error).toBe(0);
      expect((await nbd.read(4096)).equals(pattern(4096, 1))).toBe(true);
      nbd.destroy();
      await expectServing();
    });

    it('answers a write past the end with ENOSPC and one to a read-only export with EPERM, consuming the payload', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk', { structured: true });
      const payload = pattern(70000, 5);
      nbd.request({
        type: Command.WRITE,
        cookie: 1n,
        offset: BigInt(SIZE) - 4096n,
        length: payload.length,
        payload,
      });
      expect(replyError(await nbd.reply())).toBe(WireError.ENOSPC);
      // Still in sync: the next request is parsed where it starts.
      nbd.request({
        type: Command.READ,
        flags: CommandFlag.DF,
        cookie: 2n,
        offset: 0n,
        length: 4096,
      });
      const r = await nbd.reply();
      expect(r[0]!.cookie).toBe(2n);
      expect(r[0]!.payload.subarray(8).equals(pattern(4096, 1))).toBe(true);
      nbd.destroy();
      const ro = await RawNbd.open(s.port, 'ro');
      ro.nbd.request({
        type: Command.WRITE,
        cookie: 3n,
        offset: 0n,
        length: payload.length,
        payload,
      });
      expect(await ro.nbd.simpleReply()).toEqual({ error: WireError.EPERM, cookie: 3n });
      ro.nbd.request({ type: Command.TRIM, cookie: 4n, offset: 0n, length: 4096 });
      expect((await ro.nbd.simpleReply()).error).toBe(WireError.EPERM);
      ro.nbd.request({ type: Command.READ, cookie: 5n, offset: 0n, length: 16 });
      expect((await ro.nbd.simpleReply()).error).toBe(0);
      expect((await ro.nbd.read(16)).every((b) => b === 0)).toBe(true);
      ro.nbd.destroy();
      await expectServing();
    });

    it('refuses a WRITE claiming a huge length and disconnects (no allocation)', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk', { extended: true });
      nbd.request({ type: Command.WRITE, cookie: 1n, offset: 0n, length: 1n << 40n });
      expect(replyError(await nbd.reply())).toBe(WireError.EOVERFLOW);
      expect(await nbd.closedWithin()).toBe(true);
      const c = await RawNbd.open(s.port, 'disk');
      c.nbd.request({ type: Command.WRITE, cookie: 2n, offset: 0n, length: 0xffffffff });
      expect((await c.nbd.simpleReply()).error).toBe(WireError.EOVERFLOW);
      expect(await c.nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('refuses a READ over the maximum block size with EOVERFLOW', async () => {
      const big = new MemoryTarget(64 * 1024 * 1024);
      s.server.addExport({ name: 'big', target: big });
      const { nbd } = await RawNbd.open(s.port, 'big', { structured: true });
      nbd.request({ type: Command.READ, cookie: 1n, offset: 0n, length: 32 * 1024 * 1024 + 1 });
      expect(replyError(await nbd.reply())).toBe(WireError.EOVERFLOW);
      nbd.destroy();
      await s.server.removeExport('big', 'hard');
      await expectServing();
    });

    it('answers target failures with their errno (EIO for the unknown), even a synchronous throw', async () => {
      const backing = new MemoryTarget(1 << 20);
      const faulty: ExportTarget = {
        size: () => backing.size(),
        read: (o, b) => {
          if (o === 0) throw new Error('thrown, not rejected');
          return backing.read(o, b);
        },
        write: async () => {
          throw Object.assign(new Error('full'), { errnoName: 'ENOSPC' });
        },
        flush: async () => {
          throw Object.assign(new Error('disk gone'), { code: 'EIO' });
        },
        trim: async () => {
          throw new Error('no errno at all');
        },
      };
      s.server.addExport({ name: 'faulty', target: faulty, writable: true });
      const { nbd } = await RawNbd.open(s.port, 'faulty', { structured: true });
      const cases: Array<[number, bigint, number, number]> = [
        [Command.READ, 0n, 512, WireError.EIO],
        [Command.WRITE, 0n, 512, WireError.ENOSPC],
        [Command.FLUSH, 0n, 0, WireError.EIO],
        [Command.TRIM, 0n, 512, WireError.EIO],
      ];
      let cookie = 0n;
      for (const [type, offset, length, errno] of cases) {
        const payload = type === Command.WRITE ? Buffer.alloc(length) : undefined;
        nbd.request({ type, cookie: ++cookie, offset, length, ...(payload ? { payload } : {}) });
        const msgs = await nbd.reply();
        expect(msgs[0]!.cookie).toBe(cookie);
        expect(replyError(msgs), `command ${type}`).toBe(errno);
      }
      nbd.request({ type: Command.READ, cookie: 99n, offset: 4096n, length: 512 });
      expect(replyError(await nbd.reply())).toBe(0);
      nbd.destroy();
      await s.server.removeExport('faulty', 'hard');
      expect(errors.some((e) => e.error.code === 'ERR_VMDISK_NBD_TARGET_ERROR')).toBe(true);
      await expectServing();
    });

    it('answers ENOMEM when the target has no buffer to give, and stays in sync', async () => {
      const backing = new MemoryTarget(1 << 20);
      let given = 0;
      let released = 0;
      const arena: ExportTarget = {
        size: () => backing.size(),
        read: (o, b) => backing.read(o, b),
        write: (o, b, f) => backing.write(o, b, f),
        allocBuffer: (n) => {
          if (n > 8192) throw Object.assign(new Error('arena full'), { errnoName: 'ENOMEM' });
          given++;
          return new Uint8Array(n);
        },
        releaseBuffer: () => {
          released++;
        },
      };
      s.server.addExport({ name: 'arena', target: arena, writable: true });
      const { nbd } = await RawNbd.open(s.port, 'arena');
      const big = Buffer.alloc(16384, 1);
      nbd.request({ type: Command.WRITE, cookie: 1n, length: big.length, payload: big });
      expect(await nbd.simpleReply()).toEqual({ error: WireError.ENOMEM, cookie: 1n });
      nbd.request({ type: Command.READ, cookie: 2n, length: 16384 });
      expect(await nbd.simpleReply()).toEqual({ error: WireError.ENOMEM, cookie: 2n });
      const small = Buffer.alloc(4096, 2);
      nbd.request({ type: Command.WRITE, cookie: 3n, length: small.length, payload: small });
      expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 3n });
      nbd.request({ type: Command.READ, cookie: 4n, length: 4096 });
      expect(await nbd.simpleReply()).toEqual({ error: 0, cookie: 4n });
      expect((await nbd.read(4096)).equals(small)).toBe(true);
      nbd.destroy();
      await s.server.removeExport('arena', 'hard');
      expect(given).toBe(2);
      expect(released).toBe(2);
    });

    it('refuses GO with an export name over 4096 bytes', async () => {
      const nbd = await RawNbd.connect(s.port);
      await nbd.handshake();
      expect(await nbd.simpleOption(Option.GO, RawNbd.goData('x'.repeat(5000)))).toBe(
        OptionReply.ERR_INVALID,
      );
      expect((await nbd.go('disk')).pop()!.type).toBe(OptionReply.ACK);
      nbd.destroy();
    });

    it('drops a client that sends a bad request magic', async () => {
      const { nbd } = await RawNbd.open(s.port, 'disk');
      nbd.request({ type: Command.READ, cookie: 1n, length: 512, magic: 0x12345678 });
      expect(await nbd.closedWithin()).toBe(true);
      await expectServing();
    });

    it('survives clients hanging up mid-request and mid-reply', async () => {
      // Half a request header.
      const a = await RawNbd.open(s.port, 'disk');
      a.nbd.write(Buffer.alloc(10, 0x25));
      a.nbd.destroy();
      // A write whose payload never fully arrives.
      const b = await RawNbd.open(s.port, 'disk');
      const h = Buffer.alloc(28);
      h.writeUInt32BE(0x25609513, 0);
      h.writeUInt16BE(Command.WRITE, 6);
      h.writeUInt32BE(1 << 20, 24);
      b.nbd.write(Buffer.concat([h, Buffer.alloc(1000)]));
      b.nbd.destroy();
      // Many large reads, then gone before the replies are read.
      const c = await RawNbd.open(s.port, 'disk');
      for (let i = 0; i < 16; i++)
        c.nbd.request({ type: Command.READ, cookie: BigInt(i), length: 1 << 20 });
      await c.nbd.read(100);
      c.nbd.destroy();
      await expectServing();
      await new Promise((r) => setTimeout(r, 100));
      expect(s.server.exportStats('disk').inFlight).toBe(0);
    });
  });

  it('stops reading a connection at maxInFlight (or at its share of requestMemoryBudget) until a request completes', async () => {
    const mem2 = new MemoryTarget(4 << 20);
    let running = 0;
    let peak = 0;
    const gated: ExportTarget = {
      size: () => mem2.size(),
      read: async (o, b) => {
        running++;
        peak = Math.max(peak, running);
        await new Promise((r) => setTimeout(r, 5));
        await mem2.read(o, b);
        running--;
      },
    };
    for (const [options, length, expected] of [
      [{ maxInFlight: 3 }, 512, 3],
      [{ maxInFlight: 16, requestMemoryBudget: 64 * 1024 }, 32 * 1024, 2],
    ] as const) {
      peak = 0;
      const t = await startServer([{ name: 'g', target: gated }], options);
      const { nbd } = await RawNbd.open(t.port, 'g');
      for (let i = 0; i < 40; i++) {
        nbd.request({ type: Command.READ, cookie: BigInt(i), offset: BigInt(i * length), length });
      }
      for (let i = 0; i < 40; i++) {
        expect((await nbd.simpleReply()).error).toBe(0);
        await nbd.read(length);
      }
      expect(peak).toBe(expected);
      nbd.destroy();
      await t.server.close();
    }
  });

  it('drops clients that never finish the handshake, serves hundreds of idle ones, and refuses beyond maxConnections', async () => {
    const t = await startServer([{ name: 'x', target: new MemoryTarget(1 << 20) }], {
      handshakeTimeoutMs: 300,
      maxConnections: 250,
    });
    const timeouts: string[] = [];
    t.server.on('error', (e) => timeouts.push(e.error.code));
    const silent = await RawNbd.connect(t.port);
    expect(await silent.closedWithin(3000)).toBe(true);
    expect(timeouts).toContain('ERR_VMDISK_NBD_HANDSHAKE_TIMEOUT');
    const idle = await Promise.all(Array.from({ length: 200 }, () => RawNbd.open(t.port, 'x')));
    await new Promise((r) => setTimeout(r, 400)); // past the handshake timeout: they stay
    expect(t.server.connectionCount).toBe(200);
    expect(t.server.exportStats('x').connections).toBe(200);
    await stillServes(t.port, 'x');
    const more = await Promise.all(Array.from({ length: 60 }, () => RawNbd.connect(t.port)));
    const refused = await Promise.all(more.map((c) => c.closedWithin(1000)));
    expect(refused.filter(Boolean).length).toBeGreaterThanOrEqual(10);
    expect(timeouts).toContain('ERR_VMDISK_NBD_TOO_MANY_CONNECTIONS');
    for (const c of more) c.destroy();
    for (const c of idle) c.nbd.destroy();
    await t.server.close();
  });

  it('removeExport: safe is refused while a client is attached, hard disconnects', async () => {
    const t = await startServer([
      { name: 'a', target: new MemoryTarget(1 << 20), writable: true },
      { name: 'b', target: new MemoryTarget(1 << 20) },
    ]);
    const a = await RawNbd.open(t.port, 'a');
    await expect(t.server.removeExport('a', 'safe')).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_EXPORT_IN_USE',
    });
    // Nothing changed: new clients still get the export, the connected one is served.
    const late = await RawNbd.connect(t.port);
    await late.handshake();
    expect((await late.go('a')).pop()!.type).toBe(OptionReply.ACK);
    late.destroy();
    a.nbd.request({ type: Command.READ, cookie: 1n, length: 16 });
    expect((await a.nbd.simpleReply()).error).toBe(0);
    await a.nbd.read(16);
    a.nbd.request({ type: Command.DISC, cookie: 2n, length: 0 });
    expect(await a.nbd.closedWithin()).toBe(true);
    await until('the client to leave', () => t.server.exportStats('a').connections === 0);
    await t.server.removeExport('a', 'safe');
    expect(t.server.listExports().map((e) => e.name)).toEqual(['b']);
    const b = await RawNbd.open(t.port, 'b');
    await t.server.removeExport('b', 'hard');
    expect(await b.nbd.closedWithin()).toBe(true);
    await expect(t.server.removeExport('b')).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_NO_SUCH_EXPORT',
    });
    await t.server.close();
  });

  it('removeExport hard resolves only once the requests in flight have left the target', async () => {
    const gated = gatedTarget();
    const t = await startServer([{ name: 'g', target: gated.target }]);
    const { nbd } = await RawNbd.open(t.port, 'g');
    nbd.request({ type: Command.READ, cookie: 1n, length: 512 });
    while (gated.started === 0) await new Promise((r) => setTimeout(r, 5));
    let removed = false;
    const removal = t.server.removeExport('g', 'hard').then(() => {
      removed = true;
    });
    expect(await nbd.closedWithin()).toBe(true);
    await new Promise((r) => setTimeout(r, 50));
    expect(removed).toBe(false);
    gated.open();
    await removal;
    expect(gated.finished).toBe(1);
    expect(t.server.listExports()).toEqual([]);
    await t.server.close();
  });

  it('removeExport safe: a client that sent NBD_CMD_DISC is leaving, not in the way; its read finishes first', async () => {
    const gated = gatedTarget();
    const t = await startServer([{ name: 'g', target: gated.target }]);
    const { nbd } = await RawNbd.open(t.port, 'g');
    // READ then DISC in one segment: both parsed in one turn, the read started.
    const header = (type: number, cookie: number, length: number) => {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(0x25609513, 0);
      h.writeUInt16BE(type, 6);
      h.writeUInt32BE(cookie, 12);
      h.writeUInt32BE(length, 24);
      return h;
    };
    nbd.write(Buffer.concat([header(Command.READ, 1, 512), header(Command.DISC, 2, 0)]));
    await until('the read to start', () => gated.started === 1);
    let removed = false;
    const removal = t.server.removeExport('g', 'safe').then(() => {
      removed = true;
    });
    expect(t.server.listExports()).toMatchObject([{ name: 'g', removing: true }]);
    gated.open();
    // The leaving client still gets its reply, then the export is gone.
    expect((await nbd.simpleReply()).error).toBe(0);
    await removal;
    expect(removed && gated.finished === 1).toBe(true);
    expect(t.server.listExports()).toEqual([]);
    nbd.destroy();
    await t.server.close();
  });

  it('emits connection and disconnect events with the client address and export', async () => {
    const t = await startServer([{ name: 'ev', target: new MemoryTarget(65536) }]);
    const events: Array<[string, unknown]> = [];
    t.server.on('connection', (e) => events.push(['connection', e]));
    t.server.on('disconnect', (e) => events.push(['disconnect', e]));
    const { nbd } = await RawNbd.open(t.port, 'ev');
    const localPort = nbd.socket.localPort;
    nbd.request({ type: Command.DISC, cookie: 1n, length: 0 });
    await nbd.closedWithin();
    while (events.length < 2) await new Promise((r) => setTimeout(r, 5));
    const expected = {
      remoteAddress: '127.0.0.1',
      remotePort: localPort,
      export: 'ev',
      tls: false,
    };
    expect(events).toEqual([
      ['connection', expect.objectContaining(expected)],
      ['disconnect', expect.objectContaining(expected)],
    ]);
    await t.server.close();
  });

  it('listens on a unix socket with mode 0600 and removes it on close', async () => {
    const { statSync, existsSync } = await import('node:fs');
    const tmp = tempDir();
    const server = new NbdServer();
    server.addExport({ name: 'u', target: new MemoryTarget(65536) });
    const path = `${tmp.dir}/nbd.sock`;
    await server.listen({ path });
    await server.listen({ port: 0 });
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const nbd = await RawNbd.connectPath(path);
    await nbd.handshake();
    expect((await nbd.go('u')).pop()!.type).toBe(OptionReply.ACK);
    nbd.destroy();
    await server.close();
    expect(existsSync(path)).toBe(false);
    tmp.cleanup();
  });

  it('replaces a stale socket at the path, refuses a regular file there, and leaves nothing behind', async () => {
    const { existsSync, readdirSync, readFileSync, writeFileSync } = await import('node:fs');
    const tmp = tempDir();
    const path = `${tmp.dir}/nbd.sock`;
    const first = new NbdServer();
    first.addExport({ name: 'u', target: new MemoryTarget(65536) });
    await first.listen({ path });
    // A crashed server leaves its socket file: the next one takes the path over.
    const second = new NbdServer();
    second.addExport({ name: 'u', target: new MemoryTarget(65536) });
    await second.listen({ path, mode: 0o660 });
    const nbd = await RawNbd.connectPath(path);
    await nbd.handshake();
    expect((await nbd.go('u')).pop()!.type).toBe(OptionReply.ACK);
    nbd.destroy();
    const file = `${tmp.dir}/not-a-socket`;
    writeFileSync(file, 'keep me');
    const third = new NbdServer();
    await expect(third.listen({ path: file })).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_LISTEN_FAILED',
      errnoName: 'EADDRINUSE',
    });
    expect(readFileSync(file, 'utf8')).toBe('keep me');
    expect(readdirSync(tmp.dir).sort()).toEqual(['nbd.sock', 'not-a-socket']);
    await Promise.all([first.close(), second.close(), third.close()]);
    expect(existsSync(path)).toBe(false);
    tmp.cleanup();
  });

  it('fails listen on an address in use with the system errno', async () => {
    const server = new NbdServer();
    await expect(server.listen({ port: s.port })).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_LISTEN_FAILED',
      errnoName: 'EADDRINUSE',
    });
    await server.close();
  });

  it('checks its arguments with stable codes', () => {
    const server = new NbdServer();
    server.addExport({ name: 'one', target: new MemoryTarget(512) });
    expect(() => server.addExport({ name: 'one', target: new MemoryTarget(512) })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_EXPORT_EXISTS' }),
    );
    const readOnly: ExportTarget = { size: () => 512, read: async () => {} };
    expect(() => server.addExport({ name: 'w', target: readOnly, writable: true })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
    expect(() =>
      server.addExport({
        name: 'bs',
        target: readOnly,
        blockSize: { minimum: 3, preferred: 4096, maximum: 65536 },
      }),
    ).toThrow(expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }));
    expect(() => new NbdServer({ maxInFlight: 0 })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
  });
});
