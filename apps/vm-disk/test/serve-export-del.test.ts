// block-export-del with a client connected, side by side with qemu-storage-daemon 7.2 on
// the same command line: safe mode (the default) is refused while a client is attached
// and changes nothing, hard mode disconnects it; the replies, errors, events and their
// order, and query-block-exports, as QEMU gives them. qemu-io holds the connection.

import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-export-del-');
const { running } = scratch;

const args = (image: string, sock: string, qmp: string) => [
  ...monitorArgs(qmp),
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  'driver=raw,node-name=d0,file=f0',
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

/** A message as compared: without its timestamp (the rest must match exactly). */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage => rest;

/** The same QMP and qemu-io steps against one daemon; what it answered, in order. */
async function scenario(qmp: string, sock: string): Promise<unknown[]> {
  const seen: unknown[] = [];
  const { client } = await QmpTestClient.connect(qmp);
  const send = (execute: string, args?: Record<string, unknown>) =>
    client.sendRaw(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
  const next = async () => bare(await client.next());
  const qemuIo = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
  try {
    await client.execute({ execute: 'qmp_capabilities' });
    seen.push(/wrote 65536\/65536/.test(await qemuIo.command('write -P 0x5a 0 64k')));
    // Safe, implicitly and explicitly: refused while qemu-io is attached; nothing changes.
    send('block-export-del', { id: 'e0' });
    seen.push(await next());
    send('block-export-del', { id: 'e0', mode: 'safe' });
    seen.push(await next());
    send('query-block-exports');
    seen.push(await next());
    seen.push(/read 65536\/65536/.test(await qemuIo.command('read -P 0x5a 0 64k')));
    // Hard: the reply, then the event once the client is gone.
    send('block-export-del', { id: 'e0', mode: 'hard' });
    seen.push(await next(), await next());
    send('query-block-exports');
    seen.push(await next());
    send('block-export-del', { id: 'e0', mode: 'hard' });
    seen.push(await next());
    seen.push(/read failed/.test(await qemuIo.command('read 0 4k')));
    // No client attached: the export goes, its event before the reply.
    send('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'd0', name: 'again' });
    seen.push(await next());
    send('block-export-del', { id: 'e1' });
    seen.push(await next(), await next());
    send('query-block-exports');
    seen.push(await next());
  } finally {
    await qemuIo.kill();
    client.close();
  }
  return seen;
}

describe('block-export-del with a client connected', () => {
  it('refuses safe mode and disconnects in hard mode, with the replies and events of qemu-storage-daemon', async () => {
    const image = scratch.path('theirs.raw');
    const mine = scratch.path('ours.raw');
    for (const f of [image, mine]) await run('qemu-img', ['create', '-f', 'raw', f, '4M']);
    const qsd = await startQsd(
      args(image, scratch.path('qsd.sock'), scratch.path('qsd.qmp')),
      scratch.path('qsd.qmp'),
    );
    running.push(qsd);
    const theirs = await scenario(scratch.path('qsd.qmp'), scratch.path('qsd.sock'));
    const ours = await startServe(args(mine, scratch.path('ours.sock'), scratch.path('ours.qmp')));
    running.push(ours);
    const got = await scenario(scratch.path('ours.qmp'), scratch.path('ours.sock'));

    const inUse = { error: { class: 'GenericError', desc: "export 'e0' still in use" } };
    const exportE0 = { type: 'nbd', id: 'e0', 'node-name': 'd0', 'shutting-down': false };
    const deleted = (id: string) => ({ event: 'BLOCK_EXPORT_DELETED', data: { id } });
    // What qemu-storage-daemon answered (the oracle, checked so that a change shows)...
    expect(theirs).toEqual([
      true,
      inUse,
      inUse,
      { return: [exportE0] },
      true,
      { return: {} },
      deleted('e0'),
      { return: [] },
      { error: { class: 'GenericError', desc: "Export 'e0' is not found" } },
      true,
      { return: {} },
      deleted('e1'),
      { return: {} },
      { return: [] },
    ]);
    // ...and vm-disk answers the same.
    expect(got).toEqual(theirs);
  });
});
