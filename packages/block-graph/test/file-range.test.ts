// BlockBackend.fileRange (NodeRead.fileRange): where a range's bytes are in a host file
// with every page cached, for the NBD server to send them from there. Checked against the
// file's own bytes and `qemu-img map`: raw (with an offset) and qcow2 data clusters give
// the file and the offset; a range whose pages are not cached, a hole, qcow2's zeros,
// unallocated or compressed clusters, direct I/O and filters give nothing; a range given
// counts as a read in the nodes' statistics.
import { execFileSync } from 'node:child_process';
import { readSync, truncateSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { pattern, tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

const MiB = 1 << 20;
const KiB = 1024;

/** The bytes of fd at offset, read with pread. */
function fileBytes(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  readSync(fd, b, 0, length, offset);
  return b;
}

/** Drops the file's pages from the page cache (GNU dd's nocache). */
function evict(path: string): void {
  execFileSync('dd', [`of=${path}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0'], {
    stdio: 'ignore',
  });
}

async function withBackend(
  nodes: Record<string, unknown>[],
  top: string,
  run: (g: BlockGraph, b: Awaited<ReturnType<BlockGraph['createBackend']>>) => Promise<void>,
): Promise<void> {
  const g = new BlockGraph();
  try {
    for (const n of nodes) await g.add(n as Parameters<BlockGraph['add']>[0]);
    const b = await g.createBackend(top);
    await run(g, b);
  } finally {
    await g.close();
  }
}

describe('BlockBackend.fileRange', () => {
  it('raw over a file: the file and the offset, while its pages are cached', async () => {
    const path = tmp.file('raw.img', pattern(1, 0, 4 * MiB));
    truncateSync(path, 8 * MiB); // a hole from 4 MiB on
    await withBackend(
      [
        { driver: 'file', 'node-name': 'f', filename: path },
        { driver: 'raw', 'node-name': 'd', file: 'f' },
        { driver: 'raw', 'node-name': 'shifted', file: 'f', offset: MiB, size: 2 * MiB },
      ],
      'd',
      async (g, b) => {
        const before = g.nodeStats('d').counters('read').operations;
        const r = b.fileRange(4 * KiB, 256 * KiB);
        expect(r).toBeDefined();
        expect(r!.offset).toBe(4 * KiB);
        expect(fileBytes(r!.fd, r!.offset, 256 * KiB).equals(pattern(1, 4 * KiB, 256 * KiB))).toBe(
          true,
        );
        expect(g.nodeStats('d').counters('read')).toMatchObject({
          operations: before + 1,
        });
        expect(g.nodeStats('f').counters('read').operations).toBeGreaterThan(0);
        // The hole is no page of the cache: it is read (as zeros).
        expect(b.fileRange(4 * MiB, 64 * KiB)).toBeUndefined();
        // raw's offset moves the range in the file.
        const s = await g.createBackend('shifted');
        expect(s.fileRange(0, 64 * KiB)?.offset).toBe(MiB);
        // Pages not cached: a sendfile of them could wait for the disk.
        evict(path);
        expect(b.fileRange(4 * KiB, 256 * KiB)).toBeUndefined();
        const buf = Buffer.alloc(256 * KiB);
        await b.read(4 * KiB, buf); // cached again
        expect(b.fileRange(4 * KiB, 256 * KiB)?.offset).toBe(4 * KiB);
      },
    );
  });

  it('qcow2: the data cluster where qemu-img map finds it; nothing for the rest', async () => {
    const img = tmp.path('q.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    execFileSync('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x5a 1M 256k',
      '-c',
      'write -z 4M 64k',
      img,
    ]);
    const comp = tmp.path('c.qcow2');
    execFileSync('qemu-img', ['convert', '-c', '-O', 'qcow2', img, comp]);
    const map = JSON.parse(
      execFileSync('qemu-img', ['map', '--output=json', '-f', 'qcow2', img], { encoding: 'utf8' }),
    ) as { start: number; length: number; data: boolean; offset?: number }[];
    const host = map.find((m) => m.start <= MiB && MiB < m.start + m.length && m.data)!;
    await withBackend(
      [
        { driver: 'file', 'node-name': 'f', filename: img },
        { driver: 'qcow2', 'node-name': 'q', file: 'f' },
        { driver: 'file', 'node-name': 'cf', filename: comp },
        { driver: 'qcow2', 'node-name': 'cq', file: 'cf' },
      ],
      'q',
      async (g, b) => {
        // The first read loads the L2 table; from then on the mapping is synchronous.
        await b.read(MiB, Buffer.alloc(4 * KiB));
        const r = b.fileRange(MiB + 64 * KiB, 128 * KiB);
        expect(r?.offset).toBe(host.offset! + (MiB + 64 * KiB - host.start));
        expect(fileBytes(r!.fd, r!.offset, 128 * KiB).every((x) => x === 0x5a)).toBe(true);
        expect(b.fileRange(8 * MiB, 64 * KiB)).toBeUndefined(); // unallocated
        expect(b.fileRange(4 * MiB, 64 * KiB)).toBeUndefined(); // zero cluster
        const c = await g.createBackend('cq');
        await c.read(MiB, Buffer.alloc(4 * KiB));
        expect(c.fileRange(MiB, 64 * KiB)).toBeUndefined(); // compressed
      },
    );
  });

  it('nothing through a filter, nor with direct I/O', async () => {
    const path = tmp.file('f.img', pattern(2, 0, 2 * MiB));
    await withBackend(
      [
        { driver: 'file', 'node-name': 'f', filename: path },
        { driver: 'raw', 'node-name': 'd', file: 'f' },
        { driver: 'copy-on-read', 'node-name': 'cor', file: 'd' },
      ],
      'cor',
      async (_g, b) => {
        expect(b.fileRange(0, 64 * KiB)).toBeUndefined();
      },
    );
    await withBackend(
      [{ driver: 'file', 'node-name': 'f', filename: path, cache: { direct: true } }],
      'f',
      async (_g, b) => {
        await b.read(0, Buffer.alloc(64 * KiB));
        expect(b.fileRange(0, 64 * KiB)).toBeUndefined();
      },
    );
  });
});
