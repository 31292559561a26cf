// configureSocket: the embedder's hook on each accepted socket, before the server's
// greeting; a throwing hook refuses that connection only. The client's: on its socket
// before the handshake; a throwing hook fails the connect.
import type net from 'node:net';
import { describe, expect, it } from 'vitest';
import { MemoryTarget, NbdClient, type NbdError } from '../src/index.ts';
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

describe('NbdClient configureSocket', () => {
  it('is called with the socket before the handshake; a throw fails the connect', async () => {
    const t = await startServer([{ name: 'x', target: new MemoryTarget(1 << 20) }]);
    const seen: { read: number; port: number | undefined }[] = [];
    const client = await NbdClient.connect(t.uri('x'), {
      configureSocket: (socket: net.Socket) => {
        seen.push({ read: socket.bytesRead, port: socket.remotePort });
      },
    });
    expect(seen).toEqual([{ read: 0, port: t.port }]);
    expect((await client.read(0, 4096)).length).toBe(4096);
    await client.close();

    const err = await NbdClient.connect(t.uri('x'), {
      configureSocket: () => {
        throw new Error('no buffer for you');
      },
    }).catch((e: NbdError) => e);
    expect((err as NbdError).code).toBe('ERR_VMDISK_NBD_CONFIGURE_SOCKET');
    expect((err as NbdError).message).toMatch(/no buffer for you/);
    await stillServes(t.port, 'x');
    await t.server.close();
  });
});
