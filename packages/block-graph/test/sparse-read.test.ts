// A READ's data and holes in one pass (BlockBackend.readSparse): a qcow2 overlay over a
// qcow2 base, read directly and through our NbdServer, with libnbd (nbdsh) showing the
// chunks and qemu-io checking the bytes.
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient, NbdServer } from '@vmdisk/nbd';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type BlockBackend, BlockGraph } from '../src/index.ts';

const KiB = 1024;
const MiB = 1 << 20;

let dir: string;
let graph: BlockGraph;
let disk: BlockBackend;
let server: NbdServer | undefined;

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-sparse-read-'));
  graph = new BlockGraph();
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 2M 64k', base]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  execFileSync('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x22 0 128k',
    '-c',
    'write -z 512k 64k',
    top,
  ]);
  await graph.add({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
  disk = await graph.createBackend('top');
});

afterEach(async () => {
  await server?.close();
  server = undefined;
  await disk.close();
  await graph.close();
  rmSync(dir, { recursive: true, force: true });
});

/** What the image reads as: 0x22 at [0, 128K), 0x11 at [2M, 2M+64K), zeros elsewhere. */
function expected(offset: number, length: number): Buffer {
  const b = Buffer.alloc(4 * MiB);
  b.fill(0x22, 0, 128 * KiB);
  b.fill(0x11, 2 * MiB, 2 * MiB + 64 * KiB);
  return b.subarray(offset, offset + length);
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** Runs a peer (never synchronously: the server answers in this process). */
function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    // nbdsh runs `python3`: the system's has libnbd's module.
    const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };
    execFile(cmd, args, { env }, (err, stdout, stderr) =>
      err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout + stderr),
    );
  });
}

const nbdsh = (uri: string, script: string): Promise<string> =>
  run('nbdsh', ['-u', uri, '-c', script]);

async function serve(): Promise<string> {
  server = new NbdServer();
  const sock = join(dir, 'nbd.sock');
  await server.listen({ path: sock });
  server.addExport({ name: 'top', target: disk });
  return `nbd+unix:///top?socket=${sock}`;
}

describe('BlockBackend.readSparse', () => {
  it('returns data and holes down the chain in one pass, with the right bytes', async () => {
    const pieces = await disk.readSparse(0, 4 * MiB, (n) => Buffer.alloc(n));
    expect(pieces.map((p) => [p.offset, p.length, p.data ? 'data' : 'hole'])).toEqual([
      [0, 128 * KiB, 'data'],
      [128 * KiB, 2 * MiB - 128 * KiB, 'hole'],
      [2 * MiB, 64 * KiB, 'data'],
      [2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, 'hole'],
    ]);
    for (const p of pieces) {
      if (p.data) expect(Buffer.from(p.data).equals(expected(p.offset, p.length))).toBe(true);
    }
  });

  it('serves holes as OFFSET_HOLE chunks (libnbd) and the same bytes as qemu-io sees', async () => {
    const uri = await serve();
    const out = await nbdsh(
      uri,
      [
        'import json, hashlib',
        'res = []',
        'for (off, n) in [(64 * 1024, 1024 * 1024), (1024 * 1024, 2 * 1024 * 1024)]:',
        '    seen = []',
        '    def cb(sub, o, status, err):',
        '        seen.append([o, len(sub), "hole" if status == nbd.READ_HOLE else "data"])',
        '        return 0',
        '    buf = h.pread_structured(n, off, cb)',
        '    res.append({"chunks": sorted(seen), "sha": hashlib.sha256(buf).hexdigest()})',
        'print(json.dumps(res))',
      ].join('\n'),
    );
    const [mixed, far] = JSON.parse(out) as Array<{
      chunks: Array<[number, number, string]>;
      sha: string;
    }>;
    // One READ within a piece: data then holes (the zero cluster and the unallocated).
    expect(mixed!.chunks).toEqual([
      [64 * KiB, 64 * KiB, 'data'],
      [128 * KiB, MiB - 64 * KiB, 'hole'],
    ]);
    expect(mixed!.sha).toBe(sha(expected(64 * KiB, MiB)));
    // A 2 MiB READ (streamed in pieces) over a hole and the base's data.
    expect(far!.chunks.filter((c) => c[2] === 'data')).toEqual([[2 * MiB, 64 * KiB, 'data']]);
    expect(far!.chunks.reduce((n, c) => n + c[1], 0)).toBe(2 * MiB);
    expect(far!.sha).toBe(sha(expected(MiB, 2 * MiB)));

    // Our own client, with and without structured replies.
    for (const structuredReplies of [true, false]) {
      const client = await NbdClient.connect(uri, { structuredReplies });
      try {
        expect(Buffer.from(await client.read(0, MiB)).equals(expected(0, MiB))).toBe(true);
      } finally {
        await client.close();
      }
    }

    // qemu-io reading the export.
    // (Asynchronously: the server answers in this process.)
    const io = await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0x22 0 128k',
      '-c',
      'read -P 0 128k 1920k',
      '-c',
      'read -P 0x11 2M 64k',
      '-c',
      'read -P 0 2112k 1984k',
      uri,
    ]);
    expect(io).not.toMatch(/verification failed|error/i);
  });
});
