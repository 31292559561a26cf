// Our client against our own server (NbdServer serving a MemoryTarget): every header style
// (extended, structured, simple), block status against the target's own view, TLS with a
// pre-shared key, and a clean disconnect seen by the server.

import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryTarget, NbdClient, NbdServer } from '../src/index.ts';
import { makeTempDir, pattern, removeDir } from './client-peers.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const KEY = '00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff';

describe('NbdClient against our NbdServer', () => {
  let dir: string;
  let server: NbdServer;
  let target: MemoryTarget;
  let socket: string;
  let clients: NbdClient[];

  beforeEach(async () => {
    dir = await makeTempDir();
    clients = [];
  });
  afterEach(async () => {
    for (const c of clients) c.destroy();
    await server?.close();
    await removeDir(dir);
  });

  const start = async (options: ConstructorParameters<typeof NbdServer>[0] = {}) => {
    server = new NbdServer(options);
    target = new MemoryTarget(8 * MiB);
    server.addExport({ name: 'mem', description: 'memory disk', target, writable: true });
    socket = join(dir, 'ours.sock');
    await server.listen({ path: socket });
  };

  /** Our client on "mem" with `options`, destroyed after the test. */
  const connect = async (options: Parameters<typeof NbdClient.connect>[1] = {}) => {
    const c = await NbdClient.connect({ path: socket }, { exportName: 'mem', ...options });
    clients.push(c);
    return c;
  };

  const exercise = async (c: NbdClient) => {
    expect(c.size).toBe(8 * MiB);
    expect(c.description).toBe('memory disk');
    const block = 64 * KiB;
    const writes = Array.from({ length: 64 }, (_, i) =>
      c.write(((i * 29) % 64) * block, pattern(block, 100 + i)),
    );
    await Promise.all(writes);
    await c.flush();
    const reads = await Promise.all(
      Array.from({ length: 64 }, (_, i) => c.read(((i * 29) % 64) * block, block)),
    );
    reads.forEach((b, i) => {
      expect(Buffer.from(b).equals(pattern(block, 100 + i))).toBe(true);
    });
    // The target holds exactly what the client wrote.
    const direct = Buffer.alloc(block);
    await target.read(((5 * 29) % 64) * block, direct);
    expect(direct.equals(pattern(block, 105))).toBe(true);

    await c.trim(0, 1 * MiB);
    await c.writeZeroes(1 * MiB, 1 * MiB, { fua: c.canFua });
    expect((await c.read(0, 2 * MiB)).every((b) => b === 0)).toBe(true);
    const there = Buffer.alloc(block);
    await target.read(2 * MiB, there);
    expect(Buffer.from(await c.read(2 * MiB, block)).equals(there)).toBe(true);

    if (c.metaContexts.length > 0) {
      const ours = (await c.blockStatus(0, 8 * MiB)).get('base:allocation')!;
      const theirs = await target.blockStatus!(0, 8 * MiB);
      expect(ours.map(({ length, hole, zero }) => ({ length, hole, zero }))).toEqual(
        theirs.map(({ length, hole, zero }) => ({ length, hole, zero })),
      );
      expect(ours[0]).toMatchObject({ hole: true, zero: true });
    }
  };

  it('works with extended headers (negotiated by default)', async () => {
    await start();
    const c = await NbdClient.connect(`nbd+unix:///mem?socket=${encodeURIComponent(socket)}`);
    clients.push(c);
    expect(c.extendedHeaders).toBe(true);
    expect(c.structuredReplies).toBe(true);
    await exercise(c);
    const disconnected = new Promise((r) => server.once('disconnect', r));
    await c.close();
    expect(await c.closed).toBeUndefined();
    await disconnected;
  });

  it('works with compact structured replies', async () => {
    await start();
    const c = await connect({ extendedHeaders: false });
    expect(c.extendedHeaders).toBe(false);
    expect(c.structuredReplies).toBe(true);
    await exercise(c);
    await c.close();
  });

  it('works with simple replies only', async () => {
    await start();
    const c = await connect({ structuredReplies: false });
    expect(c.structuredReplies).toBe(false);
    expect(c.metaContexts).toEqual([]);
    await exercise(c);
    await c.close();
  });

  it('works over TLS with a pre-shared key', async () => {
    await start({ tls: { mode: 'require', psk: { alice: KEY } } });
    const plain = await NbdClient.connect({ path: socket }, { exportName: 'mem' }).catch(
      (e: unknown) => e,
    );
    expect(plain).toMatchObject({ code: 'ERR_VMDISK_NBD_TLS_REQUIRED' });
    const c = await connect({ tls: { psk: { identity: 'alice', key: KEY } } });
    expect(c.tls).toBe(true);
    await exercise(c);
    await c.close();
    expect(
      await NbdClient.listExports(
        { path: socket },
        { tls: { psk: { identity: 'alice', key: KEY } } },
      ),
    ).toEqual([{ name: 'mem', description: 'memory disk' }]);
  });
});
