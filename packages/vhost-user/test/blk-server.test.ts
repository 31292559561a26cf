// VhostUserBlkServer against the raw front-end of raw-vhost-client.ts: negotiation, the
// config space, every virtio-blk request on a file (checked against the file itself),
// and guests that break the rules.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileTarget } from '@vmdisk/nbd';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { VhostUserBlkServer, type VhostUserError } from '../src/index.ts';
import { closeFd, eventfd } from '../src/native.ts';
import {
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_S_UNSUPP,
  BLK_T,
  F,
  PROTOCOL_F,
  VHOST_USER,
  VRING_DESC_F_INDIRECT,
} from '../src/protocol.ts';
import { pair, RawVhostClient, u64 } from './raw-vhost-client.ts';

const SIZE = 4 * 1024 * 1024;
const ALL_PROTOCOL = (1n << BigInt(PROTOCOL_F.CONFIG)) | (1n << BigInt(PROTOCOL_F.REPLY_ACK)) | 1n;

let dir: string;
let cleanup: (() => Promise<void> | void)[];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-blk-'));
  cleanup = [];
});

afterEach(async () => {
  for (const c of cleanup.reverse()) await c();
  rmSync(dir, { recursive: true, force: true });
});

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

async function serve(
  name: string,
  options: {
    writable?: boolean;
    numQueues?: number;
    logicalBlockSize?: number;
    writethrough?: boolean;
  } = {},
) {
  const file = join(dir, `${name}.raw`);
  writeFileSync(file, pattern(SIZE, 3));
  const target = await FileTarget.open(file, { readOnly: options.writable === false });
  // The FUA flag of each write the target is given.
  const fua: boolean[] = [];
  const write = target.write;
  if (write) {
    target.write = (offset, buf, flags) => {
      fua.push(flags.fua === true);
      return write(offset, buf, flags);
    };
  }
  const errors: VhostUserError[] = [];
  const path = join(dir, `${name}.sock`);
  const server = new VhostUserBlkServer({
    path,
    target,
    writable: options.writable ?? true,
    ...(options.numQueues !== undefined && { numQueues: options.numQueues }),
    ...(options.logicalBlockSize !== undefined && { logicalBlockSize: options.logicalBlockSize }),
    ...(options.writethrough !== undefined && { writethrough: options.writethrough }),
    onError: (e) => errors.push(e),
  });
  server.listen();
  cleanup.push(async () => {
    await server.close();
    await target.close();
  });
  return { file, path, server, errors, fua };
}

async function connect(path: string, queues = 1): Promise<RawVhostClient> {
  const c = RawVhostClient.connect(path);
  cleanup.push(() => c.close());
  await c.negotiate(ALL_PROTOCOL);
  expect(await c.setMemTable()).toBe(0n);
  for (let q = 0; q < queues; q++) c.startQueue(q);
  return c;
}

describe('negotiation and config', () => {
  it('offers qemu-storage-daemon features and config space', async () => {
    const { path } = await serve('a', { numQueues: 2, logicalBlockSize: 4096 });
    const c = RawVhostClient.connect(path);
    cleanup.push(() => c.close());
    const { features, protocol } = await c.negotiate(ALL_PROTOCOL);
    for (const f of [
      F.VERSION_1,
      F.PROTOCOL_FEATURES,
      F.BLK_FLUSH,
      F.BLK_DISCARD,
      F.BLK_WRITE_ZEROES,
      F.BLK_MQ,
      F.BLK_SEG_MAX,
      F.BLK_BLK_SIZE,
      F.RING_INDIRECT_DESC,
    ]) {
      expect(features & (1n << BigInt(f)), `feature ${f}`).not.toBe(0n);
    }
    expect(features & (1n << BigInt(F.BLK_RO))).toBe(0n);
    expect(protocol & ALL_PROTOCOL).toBe(ALL_PROTOCOL);
    expect(await c.getU64(VHOST_USER.GET_QUEUE_NUM)).toBe(2n);
    const cfg = await c.config();
    expect(cfg.getBigUint64(0, true)).toBe(BigInt(SIZE / 512));
    expect(cfg.getUint32(12, true)).toBe(126); // seg_max
    expect(cfg.getUint32(20, true)).toBe(4096); // blk_size
    expect(cfg.getUint16(34, true)).toBe(2); // num_queues
    expect(cfg.getUint32(36, true)).toBe(32768); // max_discard_sectors
    expect(cfg.getUint32(44, true)).toBe(8); // discard_sector_alignment
    expect(cfg.getUint32(48, true)).toBe(32768); // max_write_zeroes_sectors
    // A piece of the config space, as the guest driver reads it field by field.
    expect((await c.config(20, 4)).getUint32(0, true)).toBe(4096);
    // The write cache starts off (write-through); the guest turns it on (CONFIG_WCE).
    expect(features & (1n << BigInt(F.BLK_CONFIG_WCE))).not.toBe(0n);
    expect((await c.config(32, 1)).getUint8(0)).toBe(0);
    const set = new Uint8Array(13);
    new DataView(set.buffer).setUint32(0, 32, true);
    new DataView(set.buffer).setUint32(4, 1, true);
    set[12] = 1;
    expect(await c.ack(VHOST_USER.SET_CONFIG, set)).toBe(0n);
    expect((await c.config(32, 1)).getUint8(0)).toBe(1);
  });

  it('offers RO on a read-only export, and refuses writes with IOERR', async () => {
    const { path, file } = await serve('ro', { writable: false });
    const c = await connect(path);
    const features = await c.getU64(VHOST_USER.GET_FEATURES);
    expect(features & (1n << BigInt(F.BLK_RO))).not.toBe(0n);
    const w = await c.blk(0, BLK_T.OUT, 0n, { out: pattern(512, 9) });
    expect(w.status).toBe(BLK_S_IOERR);
    const r = await c.blk(0, BLK_T.IN, 0n, { inLen: 4096 });
    expect(r.status).toBe(BLK_S_OK);
    expect(r.data).toEqual(new Uint8Array(readFileSync(file).subarray(0, 4096)));
  });
});

describe('requests', () => {
  it('writes and reads through guest memory, scattered over both regions', async () => {
    const { path, file } = await serve('io');
    const c = await connect(path);
    const data = pattern(64 * 1024, 11);
    const w = await c.blk(0, BLK_T.OUT, 8n, { out: data, segments: 4 });
    expect(w).toMatchObject({ status: BLK_S_OK, len: 1 });
    expect(new Uint8Array(readFileSync(file).subarray(4096, 4096 + data.length))).toEqual(data);
    const r = await c.blk(0, BLK_T.IN, 8n, { inLen: data.length, segments: 2 });
    expect(r).toMatchObject({ status: BLK_S_OK, len: data.length + 1 });
    expect(r.data).toEqual(data);
    // Far enough on that buffers come from the second region (its mmap offset is 8 MiB).
    for (let i = 0; i < 130; i++) c.alloc(64 * 1024, 512);
    const r2 = await c.blk(0, BLK_T.IN, 0n, { inLen: 8192 }, { indirect: true });
    expect(r2.status).toBe(BLK_S_OK);
    expect(r2.data).toEqual(new Uint8Array(readFileSync(file).subarray(0, 8192)));
    expect((await c.blk(0, BLK_T.FLUSH, 0n)).status).toBe(BLK_S_OK);
  });

  it('flushes writes as qemu-storage-daemon 7.2: by the writethrough option, then the guest config', async () => {
    const setWce = (c: RawVhostClient, on: boolean) => {
      const set = new Uint8Array(13);
      new DataView(set.buffer).setUint32(0, 32, true);
      new DataView(set.buffer).setUint32(4, 1, true);
      set[12] = on ? 1 : 0;
      return c.ack(VHOST_USER.SET_CONFIG, set);
    };
    const data = pattern(4096, 5);
    // The backend's write cache is on (writethrough defaults off), though the guest's
    // config says write-through: its writes are not flushed one by one.
    const wb = await serve('wb');
    const c = await connect(wb.path);
    expect((await c.config(32, 1)).getUint8(0)).toBe(0);
    expect((await c.blk(0, BLK_T.OUT, 0n, { out: data })).status).toBe(BLK_S_OK);
    // The guest turns its write cache off, then on again.
    expect(await setWce(c, false)).toBe(0n);
    expect((await c.blk(0, BLK_T.OUT, 8n, { out: data })).status).toBe(BLK_S_OK);
    expect(await setWce(c, true)).toBe(0n);
    expect((await c.blk(0, BLK_T.OUT, 16n, { out: data })).status).toBe(BLK_S_OK);
    expect(wb.fua).toEqual([false, true, false]);
    // writethrough=on: each write is durable when it completes.
    const wt = await serve('wt', { writethrough: true });
    const c2 = await connect(wt.path);
    expect((await c2.config(32, 1)).getUint8(0)).toBe(0);
    expect((await c2.blk(0, BLK_T.OUT, 0n, { out: data })).status).toBe(BLK_S_OK);
    expect(wt.fua).toEqual([true]);
    expect(new Uint8Array(readFileSync(wt.file).subarray(0, 4096))).toEqual(data);
  });

  it('answers GET_ID with the serial', async () => {
    const { path } = await serve('id');
    const c = await connect(path);
    const r = await c.blk(0, BLK_T.GET_ID, 0n, { inLen: 20 });
    expect(r.status).toBe(BLK_S_OK);
    expect(r.len).toBe(21);
    expect(Buffer.from(r.data).toString('latin1').replace(/\0+$/, '')).toBe('vhost_user_blk');
  });

  it('discards and writes zeroes (with and without unmap)', async () => {
    const { path, file } = await serve('dz');
    const c = await connect(path);
    const seg = (sector: bigint, sectors: number, flags: number) => {
      const b = new Uint8Array(16);
      const v = new DataView(b.buffer);
      v.setBigUint64(0, sector, true);
      v.setUint32(8, sectors, true);
      v.setUint32(12, flags, true);
      return b;
    };
    expect((await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: seg(8n, 16, 0) })).status).toBe(BLK_S_OK);
    expect((await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: seg(64n, 128, 1) })).status).toBe(
      BLK_S_OK,
    );
    const bytes = readFileSync(file);
    expect(bytes.subarray(4096, 4096 + 8192).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(32768, 32768 + 65536).every((b) => b === 0)).toBe(true);
    expect(bytes[4096 + 8192]).not.toBe(0);
    expect((await c.blk(0, BLK_T.DISCARD, 0n, { out: seg(1024n, 2048, 0) })).status).toBe(BLK_S_OK);
    // Discard takes no flags; write zeroes only unmap.
    expect((await c.blk(0, BLK_T.DISCARD, 0n, { out: seg(0n, 8, 1) })).status).toBe(BLK_S_UNSUPP);
    expect((await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: seg(0n, 8, 2) })).status).toBe(
      BLK_S_UNSUPP,
    );
    expect((await c.blk(0, BLK_T.DISCARD, 0n, { out: seg(BigInt(SIZE / 512), 8, 0) })).status).toBe(
      BLK_S_IOERR,
    );
  });

  it('answers bad requests with IOERR or UNSUPP and keeps serving', async () => {
    const { path, errors } = await serve('bad', { logicalBlockSize: 4096 });
    const c = await connect(path);
    expect((await c.blk(0, BLK_T.IN, BigInt(SIZE / 512), { inLen: 4096 })).status).toBe(
      BLK_S_IOERR,
    );
    expect((await c.blk(0, BLK_T.IN, 1n, { inLen: 4096 })).status).toBe(BLK_S_IOERR); // unaligned
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_IOERR);
    expect((await c.blk(0, 99, 0n)).status).toBe(BLK_S_UNSUPP);
    // A header of 8 bytes.
    const hdr = c.alloc(8);
    const st = c.alloc(1, 1);
    const short = await c.submitChain(0, [
      { gpa: hdr, len: 8, write: false },
      { gpa: st, len: 1, write: true },
    ]);
    expect(short.len).toBe(1);
    expect(c.mem[c.at(st)]).toBe(BLK_S_IOERR);
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 4096 })).status).toBe(BLK_S_OK);
    expect(errors.map((e) => e.code)).toEqual(Array(5).fill('ERR_VMDISK_VHOST_BAD_REQUEST'));
  });

  it('signals by event index when negotiated (as Linux guests do)', async () => {
    const { path, file } = await serve('evidx');
    const c = RawVhostClient.connect(path);
    cleanup.push(() => c.close());
    await c.negotiate(ALL_PROTOCOL, { eventIdx: true });
    expect(await c.setMemTable()).toBe(0n);
    c.startQueue(0);
    for (let i = 0; i < 20; i++) {
      expect((await c.blk(0, BLK_T.IN, BigInt(i * 8), { inLen: 4096 })).status).toBe(BLK_S_OK);
    }
    const reads = await Promise.all(
      Array.from({ length: 16 }, (_, i) => c.blk(0, BLK_T.IN, BigInt(i * 8), { inLen: 4096 })),
    );
    const bytes = readFileSync(file);
    reads.forEach((r, i) => {
      expect(r.status).toBe(BLK_S_OK);
      expect(Buffer.from(r.data).equals(bytes.subarray(i * 4096, (i + 1) * 4096))).toBe(true);
    });
  });

  it('asks for the kicks it needs: a front-end that kicks only when avail_event says so never stalls', async () => {
    // The device takes buffers that come while its requests are in flight without a kick,
    // and asks for one (avail_event) before it goes idle: a lost kick would hang here.
    const { path, file } = await serve('kickbyevent');
    const c = RawVhostClient.connect(path);
    cleanup.push(() => c.close());
    await c.negotiate(ALL_PROTOCOL, { eventIdx: true, kickByEvent: true });
    expect(await c.setMemTable()).toBe(0n);
    c.startQueue(0);
    for (let i = 0; i < 20; i++) {
      expect((await c.blk(0, BLK_T.IN, BigInt(i * 8), { inLen: 4096 })).status).toBe(BLK_S_OK);
    }
    for (let round = 0; round < 4; round++) {
      const data = pattern(4096, round);
      const all = await Promise.all(
        Array.from({ length: 16 }, (_, i) =>
          i % 2 === 0
            ? c.blk(0, BLK_T.OUT, BigInt(i * 8), { out: data })
            : c.blk(0, BLK_T.IN, BigInt(i * 8), { inLen: 4096 }),
        ),
      );
      for (const r of all) expect(r.status).toBe(BLK_S_OK);
      const bytes = readFileSync(file);
      expect(new Uint8Array(bytes.subarray(0, 4096))).toEqual(data);
    }
    // 20 + 64 requests: the ones started while others were in flight needed no kick.
    expect(c.kicks).toBeLessThan(20 + 64);
  });

  it('serves several queues', async () => {
    const { path, file } = await serve('mq', { numQueues: 2 });
    const c = await connect(path, 2);
    const data = pattern(4096, 5);
    expect((await c.blk(1, BLK_T.OUT, 0n, { out: data })).status).toBe(BLK_S_OK);
    const r = await c.blk(0, BLK_T.IN, 0n, { inLen: 4096 });
    expect(r.data).toEqual(data);
    expect(new Uint8Array(readFileSync(file).subarray(0, 4096))).toEqual(data);
  });
});

describe('vring and memory management', () => {
  it('GET_VRING_BASE stops the ring at its index; a restarted ring goes on from it', async () => {
    const { path } = await serve('base');
    const c = await connect(path);
    for (let i = 0; i < 3; i++) await c.blk(0, BLK_T.IN, 0n, { inLen: 512 });
    expect(await c.vringBase(0)).toBe(3);
  });

  it('takes a new memory table while the rings run, with REPLY_ACK', async () => {
    const { path } = await serve('mem');
    const c = await connect(path);
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
    expect(await c.setMemTable()).toBe(0n);
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
  });

  it('replaces a stale socket at its path, and takes a new front-end after one leaves', async () => {
    const path = join(dir, 'stale.sock');
    writeFileSync(path, 'left behind');
    const file = join(dir, 'stale.raw');
    writeFileSync(file, pattern(SIZE, 1));
    const target = await FileTarget.open(file);
    const server = new VhostUserBlkServer({ path, target, writable: true });
    server.listen();
    cleanup.push(async () => {
      await server.close();
      await target.close();
    });
    const c1 = await connect(path);
    expect((await c1.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
    c1.close();
    const c2 = await connect(path);
    expect((await c2.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
  });
});

describe('the rest of the protocol', () => {
  it('SET_VRING_ENABLE 0 holds requests until the ring is enabled again', async () => {
    const { path } = await serve('enable');
    const c = await connect(path);
    expect(await c.ack(VHOST_USER.SET_VRING_ENABLE, pair(0, 0))).toBe(0n);
    const pending = c.blk(0, BLK_T.IN, 0n, { inLen: 512 });
    expect(await c.ack(VHOST_USER.SET_VRING_ENABLE, pair(0, 1))).toBe(0n);
    expect((await pending).status).toBe(BLK_S_OK);
  });

  it('takes SET_VRING_ERR, and starts over after RESET_OWNER', async () => {
    const { path } = await serve('reset');
    const c = await connect(path);
    const err = eventfd();
    cleanup.push(() => void closeFd(err));
    expect(await c.ack(VHOST_USER.SET_VRING_ERR, u64(0n), [err])).toBe(0n);
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
    expect(await c.ack(VHOST_USER.RESET_OWNER)).toBe(0n);
    expect(await c.setMemTable()).toBe(0n);
    c.startQueue(0);
    expect((await c.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
  });

  it.each([
    [
      'a ring size that is not a power of 2',
      (c: RawVhostClient) => c.send(VHOST_USER.SET_VRING_NUM, pair(0, 3)),
    ],
    [
      'a ring that does not exist',
      (c: RawVhostClient) => c.send(VHOST_USER.SET_VRING_NUM, pair(5, 128)),
    ],
    [
      'a memory table without its fds',
      (c: RawVhostClient) => c.send(VHOST_USER.SET_MEM_TABLE, c.memTablePayload().payload),
    ],
    [
      'a message too large',
      (c: RawVhostClient) => c.send(VHOST_USER.SET_FEATURES, new Uint8Array(8192)),
    ],
    [
      'a kick before the memory table',
      (c: RawVhostClient) => {
        const kick = eventfd();
        c.send(VHOST_USER.SET_VRING_KICK, u64(0n), [kick]);
        closeFd(kick);
      },
    ],
  ])('%s closes the connection (ERR_VMDISK_VHOST_BAD_MESSAGE or DEVICE_BROKEN)', async (_, act) => {
    const { path, errors } = await serve('proto');
    const c = RawVhostClient.connect(path);
    cleanup.push(() => c.close());
    await c.negotiate(ALL_PROTOCOL);
    act(c);
    await c.closed;
    expect(errors.map((e) => e.code)).toEqual([
      expect.stringMatching(/^ERR_VMDISK_VHOST_(BAD_MESSAGE|DEVICE_BROKEN)$/),
    ]);
  });
});

describe('bad guests', () => {
  it('a looping descriptor chain breaks the device; other exports keep serving', async () => {
    const a = await serve('loop');
    const b = await serve('other');
    const bad = await connect(a.path);
    const good = await connect(b.path);
    const hdr = bad.alloc(16);
    // Descriptors head -> head+1 -> head: never ends.
    void bad.submitChain(
      0,
      [
        { gpa: hdr, len: 16, write: false },
        { gpa: hdr, len: 16, write: false },
      ],
      { nextOf: (i) => (i % 2 === 0 ? i + 1 : i - 1) },
    );
    await bad.closed;
    expect(a.errors.map((e) => e.code)).toEqual(['ERR_VMDISK_VHOST_DEVICE_BROKEN']);
    expect(a.errors[0]!.message).toMatch(/loops/);
    expect((await good.blk(0, BLK_T.IN, 0n, { inLen: 4096 })).status).toBe(BLK_S_OK);
    // The broken export takes a new front-end.
    const again = await connect(a.path);
    expect((await again.blk(0, BLK_T.IN, 0n, { inLen: 512 })).status).toBe(BLK_S_OK);
  });

  it('a buffer outside guest memory gets IOERR; a status byte outside breaks the device', async () => {
    const { path, errors } = await serve('range');
    const c = await connect(path);
    const hdr = c.alloc(16);
    new DataView(c.mem.buffer, c.mem.byteOffset + c.at(hdr)).setUint32(0, BLK_T.IN, true);
    const st = c.alloc(1, 1);
    const r = await c.submitChain(0, [
      { gpa: hdr, len: 16, write: false },
      { gpa: 0x5000_0000n, len: 4096, write: true },
      { gpa: st, len: 1, write: true },
    ]);
    expect(r.len).toBe(1);
    expect(c.mem[c.at(st)]).toBe(BLK_S_IOERR);
    expect(errors.at(-1)?.code).toBe('ERR_VMDISK_VHOST_BAD_REQUEST');
    void c.submitChain(0, [
      { gpa: hdr, len: 16, write: false },
      { gpa: 0x5000_0000n, len: 1, write: true },
    ]);
    await c.closed;
    expect(errors.at(-1)?.code).toBe('ERR_VMDISK_VHOST_DEVICE_BROKEN');
  });

  it.each([
    ['outside guest memory', false, /indirect table outside guest memory/],
    ['nested in another', true, /nested indirect/],
  ])('an indirect table %s breaks the device', async (_, nested, message) => {
    const { path, errors } = await serve('ind2');
    const c = await connect(path);
    const table = nested ? c.alloc(32) : 0x5000_0000n;
    void c.submitChain(0, [{ gpa: table, len: 32, write: false, flags: VRING_DESC_F_INDIRECT }], {
      indirect: nested,
    });
    await c.closed;
    expect(errors.at(-1)?.code).toBe('ERR_VMDISK_VHOST_DEVICE_BROKEN');
    expect(errors.at(-1)?.message).toMatch(message);
  });

  it('a chain head out of range breaks the device', async () => {
    const { path, errors } = await serve('ind');
    const c = await connect(path);
    void c.submitChain(0, [{ gpa: 0n, len: 16, write: false }], { head: 200 });
    await c.closed;
    expect(errors.at(-1)?.message).toMatch(/out of range/);
  });

  it('a message the protocol does not have closes the connection', async () => {
    const { path, errors } = await serve('msg');
    const c = RawVhostClient.connect(path);
    cleanup.push(() => c.close());
    c.send(200);
    await c.closed;
    expect(errors[0]?.code).toBe('ERR_VMDISK_VHOST_BAD_MESSAGE');
  });
});
