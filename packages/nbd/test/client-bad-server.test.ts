// Our client against a scripted server that breaks the protocol on purpose (no real server
// does this on demand): wrong magic, unknown cookie, oversized lengths, chunks outside the
// request, a handshake that never ends. Each must end in a clear error and a disconnect,
// never a crash or an allocation sized by the server. The same script also drives
// extended headers and the ESHUTDOWN soft disconnect, which the Debian peers lack.

import * as net from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdClient, NbdCommandError, NbdConnectionError } from '../src/index.ts';
import {
  ChunkType,
  Command,
  CommandFlag,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Option,
  OptionReply,
  REPLY_FLAG_DONE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlag,
} from '../src/protocol.ts';
import { freePort, makeTempDir, removeDir } from './client-peers.ts';

/** Exact reads on the server side of a socket. */
class Io {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  ended = false;
  readonly closed: Promise<void>;

  readonly sock: net.Socket;

  constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    this.closed = new Promise((resolve) => {
      sock.on('close', () => {
        this.ended = true;
        this.wake?.();
        resolve();
      });
    });
    sock.on('error', () => {});
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error('closed');
      await new Promise<void>((r) => {
        this.wake = r;
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }
}

const u16 = (v: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
};
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};

const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) =>
  Buffer.concat([u64(OPTION_REPLY_MAGIC), u32(opt), u32(type), u32(data.length), data]);

interface Hs {
  size?: number;
  flags?: number;
  structured?: boolean;
  extended?: boolean;
  contexts?: string[];
}

/** The server's greeting (newstyle, with `flags`); returns once the client sent its flags. */
async function greet(io: Io, flags: number): Promise<void> {
  io.write(Buffer.concat([u64(NBDMAGIC), u64(IHAVEOPT), u16(flags)]));
  await io.read(4);
}

/** The client's next option: its code and its data. */
async function readOption(io: Io): Promise<{ opt: number; data: Buffer }> {
  const h = await io.read(16);
  return { opt: h.readUInt32BE(8), data: await io.read(h.readUInt32BE(12)) };
}

/** A well-behaved handshake; returns once GO is acknowledged. */
async function handshake(io: Io, hs: Hs = {}): Promise<void> {
  await greet(io, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  for (;;) {
    const { opt } = await readOption(io);
    switch (opt) {
      case Option.EXTENDED_HEADERS:
        io.write(optReply(opt, hs.extended ? OptionReply.ACK : OptionReply.ERR_UNSUP));
        break;
      case Option.STRUCTURED_REPLY:
        io.write(optReply(opt, hs.structured === false ? OptionReply.ERR_UNSUP : OptionReply.ACK));
        break;
      case Option.SET_META_CONTEXT:
        (hs.contexts ?? ['base:allocation']).forEach((name, i) => {
          io.write(
            optReply(opt, OptionReply.META_CONTEXT, Buffer.concat([u32(i + 1), Buffer.from(name)])),
          );
        });
        io.write(optReply(opt, OptionReply.ACK));
        break;
      case Option.GO: {
        const flags =
          hs.flags ??
          TransmissionFlag.HAS_FLAGS |
            TransmissionFlag.SEND_FLUSH |
            TransmissionFlag.SEND_WRITE_ZEROES;
        io.write(
          optReply(
            opt,
            OptionReply.INFO,
            Buffer.concat([u16(Info.EXPORT), u64(hs.size ?? 1 << 20), u16(flags)]),
          ),
        );
        io.write(optReply(opt, OptionReply.ACK));
        return;
      }
      default:
        io.write(optReply(opt, OptionReply.ERR_UNSUP));
    }
  }
}

interface Req {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  payload?: Buffer;
}

async function readRequest(io: Io, extended = false): Promise<Req> {
  const h = await io.read(extended ? 32 : 28);
  const magic = h.readUInt32BE(0);
  if (magic !== (extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC))
    throw new Error('bad request magic');
  const req: Req = {
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    cookie: Buffer.from(h.subarray(8, 16)),
    offset: Number(h.readBigUInt64BE(16)),
    length: extended ? Number(h.readBigUInt64BE(24)) : h.readUInt32BE(24),
  };
  if (req.type === Command.WRITE) req.payload = Buffer.from(await io.read(req.length));
  return req;
}

const simple = (cookie: Buffer, error = 0) =>
  Buffer.concat([u32(SIMPLE_REPLY_MAGIC), u32(error), cookie]);
const chunk = (flags: number, type: number, cookie: Buffer, payload: Buffer) =>
  Buffer.concat([
    u32(STRUCTURED_REPLY_MAGIC),
    u16(flags),
    u16(type),
    cookie,
    u32(payload.length),
    payload,
  ]);
const extChunk = (flags: number, type: number, cookie: Buffer, offset: number, payload: Buffer) =>
  Buffer.concat([
    u32(EXTENDED_REPLY_MAGIC),
    u16(flags),
    u16(type),
    cookie,
    u64(offset),
    u64(payload.length),
    payload,
  ]);

describe('NbdClient against a misbehaving server', () => {
  let dir: string;
  let server: net.Server;
  let sockPath: string;
  let script: (io: Io) => Promise<void>;
  let serverIo: Io[];
  let clients: NbdClient[];

  beforeEach(async () => {
    dir = await makeTempDir();
    sockPath = join(dir, 'bad.sock');
    serverIo = [];
    clients = [];
    script = async () => {};
    server = net.createServer((sock) => {
      const io = new Io(sock);
      serverIo.push(io);
      script(io).catch(() => sock.destroy());
    });
    await new Promise<void>((r) => server.listen(sockPath, r));
  });
  afterEach(async () => {
    for (const c of clients) c.destroy();
    for (const io of serverIo) io.sock.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    await removeDir(dir);
  });

  const connect = async (opts: Parameters<typeof NbdClient.connect>[1] = {}) => {
    const c = await NbdClient.connect({ path: sockPath }, opts);
    clients.push(c);
    return c;
  };

  /** The request fails with a protocol error, the client disconnects, later requests fail. */
  const expectProtocolFailure = async (c: NbdClient, p: Promise<unknown>, why: RegExp) => {
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_NBD_PROTOCOL_ERROR' });
    expect((err as Error).message).toMatch(why);
    expect(await c.closed).toBe(err);
    await serverIo[0]!.closed;
    await expect(c.read(0, 512)).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_PROTOCOL_ERROR' });
  };

  it('reports a failed connect with the system errno', async () => {
    const missing = await NbdClient.connect({ path: join(dir, 'nothing.sock') }).catch(
      (e: unknown) => e,
    );
    expect(missing).toBeInstanceOf(NbdConnectionError);
    expect(missing).toMatchObject({
      code: 'ERR_VMDISK_NBD_CONNECT_FAILED',
      errnoName: 'ENOENT',
      syscall: 'connect',
    });
    const port = await freePort();
    await expect(NbdClient.connect({ host: '127.0.0.1', port })).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_CONNECT_FAILED',
      errnoName: 'ECONNREFUSED',
    });
  });

  it('rejects a greeting that is not NBD', async () => {
    script = async (io) => {
      io.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
    };
    await expect(NbdClient.connect({ path: sockPath })).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_PROTOCOL_ERROR',
    });
  });

  it('refuses an option reply claiming 4 GiB without allocating it', async () => {
    script = async (io) => {
      await greet(io, FLAG_FIXED_NEWSTYLE);
      const { opt } = await readOption(io);
      io.write(
        Buffer.concat([u64(OPTION_REPLY_MAGIC), u32(opt), u32(OptionReply.ACK), u32(0xffffffff)]),
      );
    };
    const err = await NbdClient.connect({ path: sockPath }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_NBD_PROTOCOL_ERROR' });
    expect(String((err as Error).message)).toContain('4294967295');
  });

  it('gives up on a handshake that never finishes (connectTimeout)', async () => {
    script = async (io) => {
      io.write(Buffer.concat([u64(NBDMAGIC), u64(IHAVEOPT), u16(FLAG_FIXED_NEWSTYLE)]));
      // ...and then nothing.
    };
    await expect(
      NbdClient.connect({ path: sockPath }, { connectTimeout: 200 }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_TIMEOUT',
    });
    const ac = new AbortController();
    const p = NbdClient.connect({ path: sockPath }, { signal: ac.signal });
    ac.abort();
    await expect(p).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_ABORTED' });
  });

  it('falls back to EXPORT_NAME when the server answers GO with ERR_UNSUP', async () => {
    let askedName = '';
    script = async (io) => {
      await greet(io, FLAG_FIXED_NEWSTYLE);
      for (;;) {
        const { opt, data } = await readOption(io);
        if (opt === Option.EXPORT_NAME) {
          askedName = data.toString();
          const flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
          io.write(Buffer.concat([u64(1 << 20), u16(flags), Buffer.alloc(124)]));
          break;
        }
        io.write(optReply(opt, OptionReply.ERR_UNSUP));
      }
      const r = await readRequest(io);
      io.write(Buffer.concat([simple(r.cookie), Buffer.alloc(r.length, 0x42)]));
    };
    const c = await connect({ exportName: 'old' });
    expect(askedName).toBe('old');
    expect(c.handshake).toBe('fixed-newstyle');
    expect(c.structuredReplies).toBe(false);
    expect(c.size).toBe(1 << 20);
    expect(c.canFlush).toBe(true);
    expect((await c.read(0, 512)).every((b) => b === 0x42)).toBe(true);
  });

  it('ends negotiation with NBD_OPT_ABORT when the server refuses the export', async () => {
    let afterRefusal = -1;
    script = async (io) => {
      await greet(io, FLAG_FIXED_NEWSTYLE);
      for (;;) {
        const { opt } = await readOption(io);
        if (opt === Option.GO) {
          io.write(optReply(opt, OptionReply.ERR_UNKNOWN, Buffer.from('no such export')));
          const next = await io.read(16);
          afterRefusal = next.readUInt32BE(8);
          return;
        }
        io.write(optReply(opt, OptionReply.ERR_UNSUP));
      }
    };
    const err = await NbdClient.connect({ path: sockPath }, { exportName: 'x' }).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({
      code: 'ERR_VMDISK_NBD_OPTION_REFUSED',
      reply: 'ERR_UNKNOWN',
      serverMessage: 'no such export',
    });
    await serverIo[0]!.closed;
    expect(afterRefusal).toBe(Option.ABORT);
  });

  it('closes even when the server does not hang up after DISC', async () => {
    let gotDisc = false;
    // A server that keeps its side open when the client ends its own.
    const stubborn = net.createServer({ allowHalfOpen: true }, (sock) => {
      const io = new Io(sock);
      serverIo.push(io);
      void (async () => {
        await handshake(io);
        const r = await readRequest(io);
        gotDisc = r.type === Command.DISC;
      })().catch(() => sock.destroy());
    });
    const path = join(dir, 'stubborn.sock');
    await new Promise<void>((r) => stubborn.listen(path, r));
    try {
      const c = await NbdClient.connect({ path });
      clients.push(c);
      await c.close();
      expect(gotDisc).toBe(true);
      expect(await c.closed).toBeUndefined();
    } finally {
      for (const io of serverIo) io.sock.destroy();
      await new Promise<void>((r) => stubborn.close(() => r()));
    }
  });

  /** One bad reply to the client's first request, after a plain handshake. */
  const badReplies: {
    what: string;
    reply: (r: Req) => Buffer;
    request: (c: NbdClient) => Promise<unknown>;
    why: RegExp;
  }[] = [
    {
      what: 'a wrong reply magic',
      reply: (r) => Buffer.concat([u32(0xdeadbeef), u32(0), r.cookie]),
      request: (c) => c.read(0, 4096),
      why: /bad reply magic 0xdeadbeef/,
    },
    {
      what: 'a reply to an unknown cookie',
      reply: (r) => {
        const other = Buffer.from(r.cookie);
        other[0] = other[0]! ^ 0xff;
        return simple(other);
      },
      request: (c) => c.flush(),
      why: /unknown cookie/,
    },
    {
      what: 'a data chunk longer than the read, before taking its payload',
      reply: (r) =>
        Buffer.concat([
          u32(STRUCTURED_REPLY_MAGIC),
          u16(REPLY_FLAG_DONE),
          u16(ChunkType.OFFSET_DATA),
          r.cookie,
          u32(0xfffffff0),
        ]),
      request: (c) => c.read(0, 4096),
      why: /data chunk of 4294967280 bytes/,
    },
    {
      what: 'a data chunk outside the requested range',
      reply: (r) =>
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.OFFSET_DATA,
          r.cookie,
          Buffer.concat([u64(r.offset + 512), Buffer.alloc(r.length)]),
        ),
      request: (c) => c.read(4096, 4096),
      why: /outside the read/,
    },
    {
      what: 'a read reply that does not cover the range',
      reply: (r) =>
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.OFFSET_DATA,
          r.cookie,
          Buffer.concat([u64(r.offset), Buffer.alloc(512)]),
        ),
      request: (c) => c.read(0, 4096),
      why: /covering 512 of 4096/,
    },
    {
      what: 'block status for a context it never selected',
      reply: (r) =>
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.BLOCK_STATUS,
          r.cookie,
          Buffer.concat([u32(7), u32(4096), u32(0)]),
        ),
      request: (c) => c.blockStatus(0, 4096),
      why: /unknown context id 7/,
    },
    {
      what: 'an error chunk whose message length lies',
      reply: (r) =>
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.ERROR,
          r.cookie,
          Buffer.concat([u32(5), u16(4000), Buffer.from('short')]),
        ),
      request: (c) => c.flush(),
      why: /message length/,
    },
    {
      what: 'an unknown chunk type',
      reply: (r) => chunk(REPLY_FLAG_DONE, 77, r.cookie, Buffer.alloc(4)),
      request: (c) => c.flush(),
      why: /unknown reply chunk type 77/,
    },
  ];
  for (const { what, reply, request, why } of badReplies) {
    it(`disconnects on ${what}`, async () => {
      script = async (io) => {
        await handshake(io);
        io.write(reply(await readRequest(io)));
      };
      const c = await connect();
      await expectProtocolFailure(c, request(c), why);
    });
  }

  it('disconnects on a BLOCK_STATUS_EXT chunk whose descriptor count lies', async () => {
    script = async (io) => {
      await handshake(io, { extended: true });
      const r = await readRequest(io, true);
      const payload = Buffer.concat([u32(1), u32(5), u64(4096), u32(0), u32(0)]);
      io.write(extChunk(REPLY_FLAG_DONE, ChunkType.BLOCK_STATUS_EXT, r.cookie, r.offset, payload));
    };
    const c = await connect();
    expect(c.extendedHeaders).toBe(true);
    await expectProtocolFailure(c, c.blockStatus(0, 4096), /declaring 5 extents but holding 1/);
  });

  it('reassembles a read from data and hole chunks in any order, split across packets', async () => {
    script = async (io) => {
      await handshake(io);
      const r = await readRequest(io);
      const half = r.length / 2;
      const reply = Buffer.concat([
        chunk(
          0,
          ChunkType.OFFSET_HOLE,
          r.cookie,
          Buffer.concat([u64(r.offset + half), u32(half / 2)]),
        ),
        chunk(
          0,
          ChunkType.OFFSET_DATA,
          r.cookie,
          Buffer.concat([u64(r.offset), Buffer.alloc(half, 0x5a)]),
        ),
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.OFFSET_DATA,
          r.cookie,
          Buffer.concat([u64(r.offset + half + half / 2), Buffer.alloc(half / 2, 0xa5)]),
        ),
      ]);
      // One byte at a time: every header and payload crosses packet boundaries.
      for (let i = 0; i < reply.length; i += 7) {
        io.write(reply.subarray(i, i + 7));
        await new Promise((res) => setImmediate(res));
      }
    };
    const c = await connect();
    const buf = Buffer.alloc(4096, 0xff);
    await c.read(8192, buf);
    expect(buf.subarray(0, 2048).every((b) => b === 0x5a)).toBe(true);
    expect(buf.subarray(2048, 3072).every((b) => b === 0)).toBe(true);
    expect(buf.subarray(3072).every((b) => b === 0xa5)).toBe(true);
    await c.close();
  });

  it('reports a structured error with its message and offset, then soft-disconnects on ESHUTDOWN', async () => {
    let gotDisc = false;
    script = async (io) => {
      await handshake(io);
      const r1 = await readRequest(io);
      const msg = Buffer.from('bad sector');
      io.write(
        chunk(
          REPLY_FLAG_DONE,
          ChunkType.ERROR_OFFSET,
          r1.cookie,
          Buffer.concat([u32(5), u16(msg.length), msg, u64(r1.offset + 1024)]),
        ),
      );
      const r2 = await readRequest(io);
      io.write(simple(r2.cookie, 108));
      const disc = await readRequest(io);
      gotDisc = disc.type === Command.DISC;
      io.sock.end();
    };
    const c = await connect();
    const err = await c.read(4096, 4096).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdCommandError);
    expect(err).toMatchObject({
      errnoName: 'EIO',
      serverMessage: 'bad sector',
      errorOffset: 5120,
      command: 'READ',
    });
    await expect(c.flush()).rejects.toMatchObject({ errnoName: 'ESHUTDOWN' });
    expect(await c.closed).toBeUndefined();
    expect(gotDisc).toBe(true);
    await expect(c.flush()).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_CLIENT_CLOSED' });
  });

  it('speaks extended headers when the server offers them', async () => {
    const seen: Req[] = [];
    script = async (io) => {
      await handshake(io, {
        extended: true,
        contexts: ['base:allocation'],
        size: 8 << 20,
        flags:
          TransmissionFlag.HAS_FLAGS |
          TransmissionFlag.SEND_WRITE_ZEROES |
          TransmissionFlag.SEND_FLUSH,
      });
      for (;;) {
        const r = await readRequest(io, true);
        seen.push(r);
        if (r.type === Command.DISC) {
          io.sock.end();
          return;
        }
        if (r.type === Command.READ) {
          io.write(
            extChunk(
              REPLY_FLAG_DONE,
              ChunkType.OFFSET_DATA,
              r.cookie,
              r.offset,
              Buffer.concat([u64(r.offset), Buffer.alloc(r.length, 0x77)]),
            ),
          );
        } else if (r.type === Command.BLOCK_STATUS) {
          io.write(
            extChunk(
              REPLY_FLAG_DONE,
              ChunkType.BLOCK_STATUS_EXT,
              r.cookie,
              r.offset,
              Buffer.concat([
                u32(1),
                u32(2),
                u64(1 << 20),
                u32(0),
                u32(0),
                u64(7 << 20),
                u32(0),
                u32(3),
              ]),
            ),
          );
        } else {
          io.write(extChunk(REPLY_FLAG_DONE, ChunkType.NONE, r.cookie, r.offset, Buffer.alloc(0)));
        }
      }
    };
    const c = await connect();
    expect(c.extendedHeaders).toBe(true);
    expect(c.structuredReplies).toBe(true);
    await c.write(4096, Buffer.alloc(4096, 1));
    expect((await c.read(0, 4096)).every((b) => b === 0x77)).toBe(true);
    await c.writeZeroes(0, 8 << 20);
    const st = (await c.blockStatus(0, 8 << 20)).get('base:allocation')!;
    expect(st).toEqual([
      { length: 1 << 20, hole: false, zero: false, flags: 0 },
      { length: 7 << 20, hole: true, zero: true, flags: 3 },
    ]);
    await c.close();
    const write = seen.find((r) => r.type === Command.WRITE)!;
    expect(write.flags & CommandFlag.PAYLOAD_LEN).toBe(CommandFlag.PAYLOAD_LEN);
    expect(write.payload!.length).toBe(4096);
    // One WRITE_ZEROES of the whole 8 MiB: 64-bit lengths need no splitting.
    expect(seen.filter((r) => r.type === Command.WRITE_ZEROES).map((r) => r.length)).toEqual([
      8 << 20,
    ]);
    expect(seen[seen.length - 1]!.type).toBe(Command.DISC);
  });
});
