// iothread objects and exports in iothreads over QMP, side by side with
// qemu-storage-daemon 7.2 on the same command line: object-add's checks, qom-list/qom-get
// of an iothread, block-export-add naming one (or one that is not there), a client served
// in it, and the order object-del / block-export-del / blockdev-del take, with QEMU's
// replies and events. (QEMU 7.2 lets object-del take an iothread an export uses and then
// crashes; vm-disk refuses it: that step is vm-disk's alone, in iothreads.test.ts.)
import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-iothreads-qmp-');
const { running } = scratch;

const args = (image: string, sock: string, qmp: string) => [
  ...monitorArgs(qmp),
  '--object',
  'iothread,id=io0',
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  'driver=raw,node-name=d0,file=f0',
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
];

const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage => rest;

async function scenario(qmp: string, sock: string): Promise<unknown[]> {
  const seen: unknown[] = [];
  const { client } = await QmpTestClient.connect(qmp);
  const send = (execute: string, args?: Record<string, unknown>) =>
    client.sendRaw(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
  const next = async () => bare(await client.next());
  const step = async (execute: string, args?: Record<string, unknown>) => {
    send(execute, args);
    seen.push(await next());
  };
  try {
    await client.execute({ execute: 'qmp_capabilities' });
    await step('object-add', { 'qom-type': 'iothread', id: 'io1' });
    await step('object-add', { 'qom-type': 'iothread', id: 'io2', 'poll-max-ns': -1 });
    await step('object-add', {
      'qom-type': 'iothread',
      id: 'io2',
      'thread-pool-min': 5,
      'thread-pool-max': 2,
    });
    await step('object-add', { 'qom-type': 'iothread', id: 'io2', bogus: 1 });
    await step('object-add', { 'qom-type': 'iothread', id: 'io1' });
    await step('qom-list', { path: '/objects/io0' });
    await step('qom-get', { path: '/objects/io0', property: 'poll-max-ns' });
    await step('qom-set', { path: '/objects/io1', property: 'poll-max-ns', value: 5 });
    await step('qom-get', { path: '/objects/io1', property: 'poll-max-ns' });
    await step('query-iothreads');
    const add = { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'disk', writable: true };
    await step('block-export-add', { ...add, iothread: 'nope' });
    await step('block-export-add', { ...add, iothread: 7 });
    await step('block-export-add', { ...add, iothread: 'io0' });
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    try {
      seen.push(/wrote 131072\/131072/.test(await io.command('write -P 0x3c 4k 128k')));
      seen.push(/read 131072\/131072/.test(await io.command('read -P 0x3c 4k 128k')));
      // Safe removal refused while the client (served in io0) is attached.
      await step('block-export-del', { id: 'e0' });
      await step('blockdev-del', { 'node-name': 'd0' });
      // Hard: the reply, and the event once the client is gone. qemu-storage-daemon
      // disconnects the client in the iothread, so its event may come before or after the
      // reply: the pair is compared reply first.
      send('block-export-del', { id: 'e0', mode: 'hard' });
      const pair = [await next(), await next()];
      seen.push(...pair.sort((a, b) => Number('event' in a) - Number('event' in b)));
      seen.push(/read failed/.test(await io.command('read 0 4k')));
    } finally {
      await io.kill();
    }
    await step('object-del', { id: 'io0' });
    await step('object-del', { id: 'io0' });
    await step('qom-list', { path: '/objects' });
    await step('blockdev-del', { 'node-name': 'd0' });
  } finally {
    client.close();
  }
  return seen;
}

describe('iothreads over QMP', () => {
  it('iothread objects and an export in one, as qemu-storage-daemon', async () => {
    const image = scratch.path('theirs.raw');
    const mine = scratch.path('ours.raw');
    for (const f of [image, mine]) await run('qemu-img', ['create', '-f', 'raw', f, '4M']);
    const qsd = await startQsd(
      args(image, scratch.path('qsd.sock'), scratch.path('qsd.qmp')),
      scratch.path('qsd.qmp'),
    );
    running.push(qsd);
    const theirs = await scenario(scratch.path('qsd.qmp'), scratch.path('qsd.sock'));
    const ours = await startServe(args(mine, scratch.path('vm.sock'), scratch.path('vm.qmp')));
    running.push(ours);
    const seen = await scenario(scratch.path('vm.qmp'), scratch.path('vm.sock'));
    expect(seen).toEqual(theirs);
    // What the client wrote through either is in the image.
    for (const f of [image, mine]) {
      expect(await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3c 4k 128k', f])).toMatch(
        /read 131072\/131072/,
      );
    }
  });
});
