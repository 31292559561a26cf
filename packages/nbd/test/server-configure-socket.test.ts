// configureSocket: the embedder's hook on each accepted socket, before the server's
// greeting; a throwing hook refuses that connection only.
import type net from 'node:net';
import { describe, expect, it } from 'vitest';
import { MemoryTarget } from '../src/index.ts';
import { RawNbd } from './raw-nbd.ts';
import { startServer, stillServes } from './server-helpers.ts';

describe('NbdServer configureSocket', () => {
  it('is called with each accepted socket before the greeting; a throw refuses only that one', async () => {
    const seen: { written: number; port: number | undefined }[] = [];
    let refuseNext = false;
    const t = await startServer([{ name: 'x', target: new MemoryTarget(1 << 20) }], {
      configureSocket: (socket: net.Socket) => {
        seen.push({ written: socket.bytesWritten, port: socket.remotePort });
        if (refuseNext) {
          refuseNext = false;
          throw new Error('no buffer for you');
        }
      },
    });
    const errors: string[] = [];
    t.server.on('error', (e) => errors.push(`${e.error.code}: ${e.error.message}`));
    await stillServes(t.port, 'x');
    expect(seen).toHaveLength(1);
    expect(seen[0]?.written).toBe(0);
    expect(seen[0]?.port).toBeGreaterThan(0);

    refuseNext = true;
    const refused = await RawNbd.connect(t.port);
    expect(await refused.closedWithin(3000)).toBe(true);
    expect(errors).toEqual([
      'ERR_VMDISK_NBD_CONFIGURE_SOCKET: connection refused: configureSocket failed: Error: no buffer for you',
    ]);
    expect(t.server.connectionCount).toBe(0);
    await stillServes(t.port, 'x');
    expect(seen).toHaveLength(3);
    await t.server.close();
  });
});
