// READs of a target that answers data and holes together (ExportTarget.readSparse): holes
// go out as OFFSET_HOLE chunks with structured replies, as zeros without; libnbd (nbdsh)
// and qemu-io as independent peers.
import { execFile } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ExportTarget, MemoryTarget, type SparsePiece } from '../src/index.ts';
import { ChunkType, Command } from '../src/protocol.ts';
import { RawNbd } from './raw-nbd.ts';
import { run, type Started, startServer } from './server-helpers.ts';

const MiB = 1 << 20;
const pattern = (n: number, seed: number): Buffer => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
};

/** MemoryTarget counting its sparse reads and plain reads. */
class CountingTarget extends MemoryTarget {
  sparseReads = 0;
  reads = 0;
  override async read(offset: number, buf: Uint8Array): Promise<void> {
    this.reads++;
    return super.read(offset, buf);
  }
  override readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    this.sparseReads++;
    return super.readSparse(offset, length, alloc);
  }
}

/** nbdsh (libnbd's python) from the system's python, which has the nbd module. */
function nbdsh(uri: string, script: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      'nbdsh',
      ['-u', uri, '-c', script],
      { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } },
      (err, stdout, stderr) =>
        err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout),
    );
  });
}

/** The chunks libnbd saw for one structured read: [offset, length, 'data' | 'hole']. */
async function chunksSeen(
  uri: string,
  offset: number,
  length: number,
): Promise<{ chunks: Array<[number, number, string]>; sha: string }> {
  const out = await nbdsh(
    uri,
    [
      'import json, hashlib',
      'seen = []',
      'def cb(sub, off, status, err):',
      '    seen.append([off, len(sub), "hole" if status == nbd.READ_HOLE else "data"])',
      '    return 0',
      `buf = h.pread_structured(${length}, ${offset}, cb)`,
      'print(json.dumps({"chunks": sorted(seen), "sha": hashlib.sha256(buf).hexdigest()}))',
    ].join('\n'),
  );
  return JSON.parse(out);
}

const sha = (b: Uint8Array): Promise<string> =>
  import('node:crypto').then((c) => c.createHash('sha256').update(b).digest('hex'));

describe('sparse READs (ExportTarget.readSparse)', () => {
  let s: Started;
  let target: CountingTarget;
  beforeAll(async () => {
    target = new CountingTarget(8 * MiB);
    // Data at [0, 64K) and [192K, 256K); the rest was never written.
    await target.write(0, pattern(65536, 1), {});
    await target.write(196608, pattern(65536, 2), {});
    s = await startServer([{ name: 'disk', target: target as ExportTarget, writable: true }]);
  });
  afterAll(async () => {
    await s.server.close();
  });

  it('answers a READ over a hole with one OFFSET_HOLE chunk, asking the target once', async () => {
    const { nbd } = await RawNbd.open(s.port, 'disk', { structured: true });
    const before = { sparse: target.sparseReads, reads: target.reads };
    nbd.request({ type: Command.READ, cookie: 1n, offset: BigInt(2 * MiB), length: MiB });
    const msgs = await nbd.reply();
    expect(msgs.map((m) => m.type)).toEqual([ChunkType.OFFSET_HOLE]);
    expect(msgs[0]!.payload.readBigUInt64BE(0)).toBe(BigInt(2 * MiB));
    expect(msgs[0]!.payload.readUInt32BE(8)).toBe(MiB);
    expect(target.sparseReads - before.sparse).toBe(1);
    expect(target.reads - before.reads).toBe(0);
    nbd.destroy();
  });

  it('answers a mixed READ with data and hole chunks holding the right bytes', async () => {
    const { nbd } = await RawNbd.open(s.port, 'disk', { structured: true });
    nbd.request({ type: Command.READ, cookie: 2n, offset: 32768n, length: 262144 });
    const msgs = await nbd.reply();
    const got = Buffer.alloc(262144, 0xee);
    const kinds: string[] = [];
    for (const m of msgs) {
      const at = Number(m.payload.readBigUInt64BE(0)) - 32768;
      if (m.type === ChunkType.OFFSET_DATA) {
        kinds.push('data');
        m.payload.subarray(8).copy(got, at);
      } else {
        expect(m.type).toBe(ChunkType.OFFSET_HOLE);
        kinds.push('hole');
        got.fill(0, at, at + m.payload.readUInt32BE(8));
      }
    }
    expect(kinds).toEqual(['data', 'hole', 'data', 'hole']);
    const want = Buffer.alloc(8 * MiB);
    await target.read(0, want);
    expect(got.equals(want.subarray(32768, 32768 + 262144))).toBe(true);
    nbd.destroy();
  });

  it('answers with zeros in a simple reply without structured replies', async () => {
    const { nbd } = await RawNbd.open(s.port, 'disk');
    nbd.request({ type: Command.READ, cookie: 3n, offset: 0n, length: 131072 });
    expect((await nbd.simpleReply()).error).toBe(0);
    const data = await nbd.read(131072);
    expect(data.subarray(0, 65536).equals(pattern(65536, 1))).toBe(true);
    expect(data.subarray(65536).every((b) => b === 0)).toBe(true);
    nbd.destroy();
  });

  it('libnbd sees holes as READ_HOLE chunks and the same bytes', async () => {
    const want = Buffer.alloc(MiB);
    await target.read(0, want);
    const seen = await chunksSeen(s.uri('disk'), 0, MiB);
    expect(seen.chunks).toEqual([
      [0, 65536, 'data'],
      [65536, 131072, 'hole'],
      [196608, 65536, 'data'],
      [262144, MiB - 262144, 'hole'],
    ]);
    expect(seen.sha).toBe(await sha(want));
    // A streamed READ (over STREAM_PIECE) of a hole: holes only.
    const far = await chunksSeen(s.uri('disk'), 4 * MiB, 2 * MiB);
    expect(far.chunks.every(([, , kind]) => kind === 'hole')).toBe(true);
    expect(far.chunks.reduce((n, [, len]) => n + len, 0)).toBe(2 * MiB);
  });

  it('qemu-io reading the export sees the data and zeros', async () => {
    const r = await run('qemu-io', [
      '-f',
      'raw',
      '-r',
      '-c',
      'read -P 0 64k 128k',
      '-c',
      'read -P 0 2M 2M',
      '-c',
      'read -v 196608 16',
      s.uri('disk'),
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed|error/i);
    const first16 = [...pattern(16, 2)].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    expect(r.stdout).toContain(first16);
  });
});
