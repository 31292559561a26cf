// `node raw-client-run.ts SOCKET [--hold]`: one scripted session of the raw front-end
// against any vhost-user-blk export (vm-disk's or qemu-storage-daemon's), for tests that
// run daemons as processes and compare them. Prints one JSON line: what the device
// offered and what each request answered. With --hold it then prints "holding" and keeps
// the connection until the export drops it (then prints "closed").
import { BLK_T, PROTOCOL_F, VHOST_USER } from '../src/protocol.ts';
import { RawVhostClient } from './raw-vhost-client.ts';

const [path, hold] = process.argv.slice(2);
if (!path) throw new Error('usage: raw-client-run.ts SOCKET [--hold]');

const c = RawVhostClient.connect(path);
const { features, protocol } = await c.negotiate(
  (1n << BigInt(PROTOCOL_F.CONFIG)) | (1n << BigInt(PROTOCOL_F.REPLY_ACK)) | 1n,
);
const queues = await c.getU64(VHOST_USER.GET_QUEUE_NUM);
const cfg = await c.config();
const memTable = await c.setMemTable();
c.startQueue(0);

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}
function segment(sector: bigint, sectors: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, sector, true);
  v.setUint32(8, sectors, true);
  v.setUint32(12, flags, true);
  return b;
}

const results: Record<string, unknown> = {};
const data = pattern(64 * 1024, 1);
results.write = await c.blk(0, BLK_T.OUT, 8n, { out: data, segments: 4 });
const read = await c.blk(0, BLK_T.IN, 8n, { inLen: data.length, segments: 2 });
results.read = { status: read.status, len: read.len, same: Buffer.compare(read.data, data) === 0 };
results.indirect = await c.blk(0, BLK_T.OUT, 256n, { out: pattern(8192, 2) }, { indirect: true });
results.flush = await c.blk(0, BLK_T.FLUSH, 0n);
const id = await c.blk(0, BLK_T.GET_ID, 0n, { inLen: 20 });
results.getId = { status: id.status, len: id.len, id: Buffer.from(id.data).toString('latin1') };
results.writeZeroes = await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: segment(16n, 8, 0) });
results.writeZeroesUnmap = await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: segment(512n, 128, 1) });
results.discard = await c.blk(0, BLK_T.DISCARD, 0n, { out: segment(1024n, 128, 0) });
results.discardFlags = await c.blk(0, BLK_T.DISCARD, 0n, { out: segment(0n, 8, 1) });
results.writeZeroesFlags = await c.blk(0, BLK_T.WRITE_ZEROES, 0n, { out: segment(0n, 8, 2) });
results.discardBeyond = await c.blk(0, BLK_T.DISCARD, 0n, { out: segment(1n << 40n, 8, 0) });
results.readBeyond = await c.blk(0, BLK_T.IN, 1n << 40n, { inLen: 512 });
results.unknown = await c.blk(0, 99, 0n);
const strip = (r: unknown) => {
  const { data: _, ...rest } = r as { data?: unknown };
  return rest;
};
for (const k of Object.keys(results)) results[k] = strip(results[k]);

console.log(
  JSON.stringify({
    features: features.toString(16),
    protocol: protocol.toString(16),
    queues: Number(queues),
    config: Buffer.from(cfg.buffer, cfg.byteOffset, cfg.byteLength).toString('hex'),
    memTable: Number(memTable),
    results,
  }),
);
if (hold === '--hold') {
  console.log('holding');
  await c.closed;
  console.log('closed');
}
c.close();
process.exit(0);
