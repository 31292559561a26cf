// BlockGraphOptions.inlineSeeks: a file node's block status (SEEK_DATA/SEEK_HOLE) asked on
// the calling thread where the filesystem looks it up (ext4 under os.tmpdir() here), or
// through the thread pool (the default, a daemon's). Seen by keeping every thread of the
// pool busy: an answer through the pool waits for one.
import { pbkdf2 } from 'node:crypto';
import { truncateSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import { tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

/** Keeps each thread of libuv's pool busy for a while; resolves when they are all free. */
function busyPool(order: string[]): Promise<void> {
  const threads = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
  return Promise.all(
    Array.from(
      { length: threads },
      () =>
        new Promise<void>((resolve) =>
          pbkdf2('x', 'y', 200_000, 32, 'sha256', () => {
            order.push('pool');
            resolve();
          }),
        ),
    ),
  ).then(() => {});
}

describe('BlockGraphOptions.inlineSeeks', () => {
  for (const inlineSeeks of [false, true]) {
    it(`file block status ${inlineSeeks ? 'at once' : 'through the thread pool'}`, async () => {
      // 64 KiB of data, then a hole to 1 MiB.
      const path = tmp.file(`seeks-${inlineSeeks}.img`, Buffer.alloc(64 << 10, 0x5a));
      truncateSync(path, 1 << 20);
      const graph = new BlockGraph({ inlineSeeks });
      try {
        await graph.add({ driver: 'file', 'node-name': 'f', filename: path });
        const node = graph.node('f');
        const order: string[] = [];
        const pool = busyPool(order);
        const status = await node.blockStatus(64 << 10, (1 << 20) - (64 << 10), true).then((s) => {
          order.push('status');
          return s;
        });
        await pool;
        expect(status).toMatchObject({ zero: true });
        if (inlineSeeks) expect(order.indexOf('status')).toBe(0);
        else expect(order.indexOf('status')).toBeGreaterThan(0);
      } finally {
        await graph.close();
      }
    });
  }
});
