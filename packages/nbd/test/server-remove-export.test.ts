// removeExport as an asynchronous operation of @vmdisk/ao, with QEMU's block-export-del
// semantics: a safe removal is refused while clients are attached and changes nothing, a
// hard one disconnects them; promise, callback and event modes; an unknown export is an
// initiation failure; no ao is left behind. Our client and qemu-io are the peers.

import { assertNoLiveAos, EventQueue, type OperationCompleteEvent } from '@vmdisk/ao';
import { afterEach, describe, expect, it } from 'vitest';
import { QemuIoSession } from '../../../tools/test-support/src/index.ts';
import { MemoryTarget, NbdClient, NbdError } from '../src/index.ts';
import { startServer, until } from './server-helpers.ts';

afterEach(() => assertNoLiveAos());

async function serverWithClient() {
  const started = await startServer([
    { name: 'disk', target: new MemoryTarget(1 << 20), writable: true },
  ]);
  const client = await NbdClient.connect(started.uri('disk'));
  return { ...started, client };
}

/** Runs `body` with a server exporting "disk" and a client attached; drops both after it. */
async function withClient(
  body: (s: Awaited<ReturnType<typeof serverWithClient>>) => Promise<void>,
): Promise<void> {
  const s = await serverWithClient();
  try {
    await body(s);
  } finally {
    s.client.destroy();
    await s.server.close();
  }
}

describe('NbdServer.removeExport as an ao', () => {
  it('safe: refused while a client is attached, and nothing changes; allowed once it left', () =>
    withClient(async ({ server, client, uri }) => {
      await expect(server.removeExport('disk', 'safe')).rejects.toMatchObject({
        code: 'ERR_VMDISK_NBD_EXPORT_IN_USE',
        message: 'export "disk" still in use (1 client connected)',
      });
      expect(() => server.removeExport('disk', 'safe', { callback: () => {} })).toThrow(
        /still in use/,
      );
      // Still exported and served: the client reads and writes, a new one connects.
      expect(server.listExports()).toMatchObject([{ name: 'disk', removing: false }]);
      await client.write(0, new Uint8Array(4096).fill(7));
      expect((await client.read(0, 4096)).every((b) => b === 7)).toBe(true);
      const second = await NbdClient.connect(uri('disk'));
      await second.close();
      await client.close();
      // The server has seen both leave once the export's connection count is 0.
      await until('both clients to leave', () => server.exportStats('disk').connections === 0);
      await server.removeExport('disk', 'safe');
      expect(server.listExports()).toEqual([]);
      await expect(NbdClient.connect(uri('disk'))).rejects.toThrow();
    }));

  it('with qemu-io holding a connection: safe is refused and qemu-io reads on; hard disconnects it', async () => {
    const { server, client, uri } = await serverWithClient();
    await client.close();
    const qemuIo = await QemuIoSession.open(['-f', 'raw', uri('disk')]);
    try {
      await until('qemu-io to attach', () => server.exportStats('disk').connections === 1);
      expect(await qemuIo.command('write -P 0x5c 0 64k')).toMatch(/wrote 65536\/65536 bytes/);
      await expect(server.removeExport('disk')).rejects.toMatchObject({
        code: 'ERR_VMDISK_NBD_EXPORT_IN_USE',
      });
      expect(await qemuIo.command('read -P 0x5c 0 64k')).toMatch(/read 65536\/65536 bytes/);
      await server.removeExport('disk', 'hard');
      expect(server.listExports()).toEqual([]);
      expect(await qemuIo.command('read 0 4k')).toMatch(/read failed/);
    } finally {
      await qemuIo.kill();
      await server.close();
    }
  });

  it('with a callback: no promise; the callback runs once, never on the caller stack', () =>
    withClient(async ({ server, client }) => {
      const calls: (Error | null | undefined)[] = [];
      let returned = false;
      const finished = new Promise<void>((resolve) => {
        const handle = server.removeExport('disk', 'hard', {
          callback: (err) => {
            expect(returned).toBe(true);
            calls.push(err);
            resolve();
          },
        });
        expect(handle).not.toBeInstanceOf(Promise);
        returned = true;
      });
      await finished;
      expect(calls).toEqual([null]);
      await expect(client.read(0, 512)).rejects.toThrow();
    }));

  it('for an event: OPERATION_COMPLETE with the cookie on the queue once the client is gone', () =>
    withClient(async ({ server, client }) => {
      const queue = new EventQueue<OperationCompleteEvent>();
      server.removeExport('disk', 'hard', { forEvent: 'remove-disk', queue });
      expect(queue.check()).toBeUndefined();
      const event = await queue.wait();
      expect(event).toMatchObject({ type: 'OPERATION_COMPLETE', forUser: 'remove-disk' });
      expect(server.listExports()).toEqual([]);
      await expect(client.read(0, 512)).rejects.toThrow();
    }));

  it('an unknown export: a rejected promise without how, a thrown initiation failure with one', async () => {
    const { server, client } = await serverWithClient();
    try {
      await expect(server.removeExport('nope')).rejects.toBeInstanceOf(NbdError);
      const callback = () => {
        throw new Error('must not be called');
      };
      expect(() => server.removeExport('nope', 'safe', { callback })).toThrow(/no export "nope"/);
    } finally {
      await client.close();
      await server.close();
    }
  });
});

describe('NbdServer.close', () => {
  it('disconnects connected clients and resolves (it does not wait for them to leave)', async () => {
    const { server, client } = await serverWithClient();
    await server.close();
    await expect(client.read(0, 512)).rejects.toThrow();
    client.destroy();
  });
});
