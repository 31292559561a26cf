// Stopping `vm-disk serve` as qemu-storage-daemon stops: SIGTERM and `quit` end it at once
// even while a QMP client stays connected (qemu-storage-daemon replies to quit, then
// closes the monitor; it sends no SHUTDOWN event), and a daemon with nothing to serve
// keeps running until told to stop.
import { afterEach, describe, expect, it } from 'vitest';
import { monitorArgs, type RunningProcess, run, useScratch, waitFor } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-stop-');
const { serve } = scratch;

const clients: QmpTestClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
});

/** A negotiated QMP client that never hangs up by itself. */
async function stayingClient(qmp: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(qmp, { stayConnected: true });
  clients.push(client);
  expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
  return client;
}

/** Resolves with the exit status, or 'still running' when it does not exit in time. */
function exitWithin(p: RunningProcess, ms: number): Promise<number | string> {
  return Promise.race([
    p.exited,
    new Promise<string>((resolve) => setTimeout(() => resolve('still running'), ms).unref()),
  ]);
}

describe('stopping vm-disk serve', () => {
  it('stops on SIGTERM while a QMP client stays connected', async () => {
    const qmp = scratch.path('qmp.sock');
    const p = await serve(monitorArgs(qmp));
    const client = await stayingClient(qmp);
    p.child.kill('SIGTERM');
    // A generous bound: the daemon must not wait for the client (which never leaves).
    expect(await exitWithin(p, 20_000)).toBe(0);
    await expect(client.next()).rejects.toThrow('QMP connection closed');
  });

  it('stops on quit while the client stays connected: the reply, then the monitor closes', async () => {
    const qmp = scratch.path('qmp.sock');
    const nbd = scratch.path('nbd.sock');
    const p = await serve([
      ...monitorArgs(qmp),
      '--blockdev',
      'driver=null-co,node-name=n0,size=1048576',
      '--nbd-server',
      `addr.type=unix,addr.path=${nbd}`,
      '--export',
      'type=nbd,id=e0,node-name=n0',
    ]);
    const client = await stayingClient(qmp);
    client.sendRaw(`${JSON.stringify({ execute: 'quit', id: 7 })}\n`);
    // As qemu-storage-daemon: the export goes away with its event before the reply, no
    // SHUTDOWN event.
    expect(await client.next()).toMatchObject({
      event: 'BLOCK_EXPORT_DELETED',
      data: { id: 'e0' },
    });
    expect(await client.next()).toEqual({ return: {}, id: 7 });
    await expect(client.next()).rejects.toThrow('QMP connection closed');
    expect(await exitWithin(p, 20_000)).toBe(0);
  });

  it('keeps running with nothing to serve until SIGTERM, as qemu-storage-daemon does', async () => {
    const p = await serve([]);
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
    expect(p.stderr()).toContain('"event":"signal"');
    expect(p.stderr()).not.toMatch(/Warning|unsettled|top-level await/);
  });

  it('keeps running with only a monitor until quit', async () => {
    const qmp = scratch.path('qmp.sock');
    const p = await serve(monitorArgs(qmp));
    const client = await stayingClient(qmp);
    expect(await client.execute({ execute: 'query-block-exports' })).toEqual({ return: [] });
    expect(await client.execute({ execute: 'quit' })).toEqual({ return: {} });
    expect(await p.exited).toBe(0);
    await waitFor('the stopped log line', () => p.stderr().includes('"event":"stopped"'));
    expect(p.stderr()).not.toMatch(/Warning|unsettled|top-level await/);
  });

  it('stops with exit status 0 when a node fails to close (EIO flushing a qcow2), as qemu-storage-daemon', async () => {
    const qmp = scratch.path('qmp.sock');
    const img = scratch.path('x.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    const node = {
      driver: 'qcow2',
      'node-name': 'x',
      file: {
        driver: 'blkdebug',
        image: { driver: 'file', filename: img },
        'inject-error': [{ iotype: 'flush', errno: 'EIO' }],
      },
    };
    const p = await serve([...monitorArgs(qmp), '--blockdev', JSON.stringify(node)]);
    const client = await stayingClient(qmp);
    expect(await client.execute({ execute: 'quit' })).toEqual({ return: {} });
    expect(await exitWithin(p, 20_000)).toBe(0);
    expect(p.stderr()).toContain('"event":"close-failed"');
    expect(p.stderr()).toContain('"event":"stopped"');
  });
});
