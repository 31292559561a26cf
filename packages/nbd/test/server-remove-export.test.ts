// removeExport as an asynchronous operation of @vmdisk/ao: promise, callback and event
// modes; safe removal waits for connected clients, an abort turns it hard; an unknown
// export is an initiation failure; no ao is left behind.
import { assertNoLiveAos, EventQueue, type OperationCompleteEvent } from '@vmdisk/ao';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryTarget, NbdClient, NbdError } from '../src/index.ts';
import { startServer } from './server-helpers.ts';

afterEach(() => assertNoLiveAos());

async function serverWithClient() {
  const started = await startServer([
    { name: 'disk', target: new MemoryTarget(1 << 20), writable: true },
  ]);
  const client = await NbdClient.connect(started.uri('disk'));
  return { ...started, client };
}

describe('NbdServer.removeExport as an ao', () => {
  it('safe: refuses new clients at once and completes only after the connected client leaves', async () => {
    const { server, client, uri } = await serverWithClient();
    try {
      let done = false;
      const removal = server.removeExport('disk', 'safe').then(() => {
        done = true;
      });
      await expect(NbdClient.connect(uri('disk'))).rejects.toThrow();
      await client.write(0, new Uint8Array(4096).fill(7));
      expect(done).toBe(false);
      await client.close();
      await removal;
      expect(server.listExports()).toEqual([]);
    } finally {
      await server.close();
    }
  });

  it('with a callback: no promise; the callback runs once, never on the caller stack', async () => {
    const { server, client } = await serverWithClient();
    try {
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
    } finally {
      client.destroy();
      await server.close();
    }
  });

  it('for an event: OPERATION_COMPLETE with the cookie on the queue; an abort makes a safe removal hard', async () => {
    const { server, client } = await serverWithClient();
    try {
      const queue = new EventQueue<OperationCompleteEvent>();
      const handle = server.removeExport('disk', 'safe', { forEvent: 'remove-disk', queue });
      expect(queue.check()).toBeUndefined();
      handle.abort(new Error('operator is impatient'));
      const event = await queue.wait();
      expect(event).toMatchObject({ type: 'OPERATION_COMPLETE', forUser: 'remove-disk' });
      await expect(client.read(0, 512)).rejects.toThrow();
    } finally {
      client.destroy();
      await server.close();
    }
  });

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
