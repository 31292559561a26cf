// query-named-block-nodes and query-block side by side with qemu-storage-daemon 7.2: the
// same nodes (raw, qcow2 with a backing file given, opened from its header or refused,
// cache.direct, detect-zeroes, a throttle filter, null-co, raw with an offset) answer
// with QEMU's BlockDeviceInfo members equal, member by member, in QEMU's order; vm-disk's
// own members (children, perm...) come along.
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-block-info-');

async function images(): Promise<void> {
  const p = scratch.path.bind(scratch);
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('r.raw'), '1M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('base.qcow2'), '1M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 64k', p('base.qcow2')]);
  // Relative and absolute backing file names in the headers.
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    'base.qcow2',
    '-F',
    'qcow2',
    p('top.qcow2'),
  ]);
  for (const name of ['abs.qcow2', 'nob.qcow2']) {
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      p('base.qcow2'),
      '-F',
      'qcow2',
      p(name),
    ]);
  }
}

function nodeArgs(): string[] {
  const p = scratch.path.bind(scratch);
  const blockdevs = [
    `driver=file,node-name=rf,filename=${p('r.raw')}`,
    'driver=raw,node-name=r,file=rf',
    `driver=file,node-name=bf,filename=${p('base.qcow2')},read-only=on`,
    'driver=qcow2,node-name=b,file=bf,read-only=on',
    `driver=file,node-name=tf,filename=${p('top.qcow2')},cache.direct=on`,
    'driver=qcow2,node-name=t,file=tf,backing=b,detect-zeroes=unmap,discard=unmap',
    `driver=file,node-name=af,filename=${p('abs.qcow2')}`,
    'driver=qcow2,node-name=a,file=af,cache.no-flush=on',
    `driver=file,node-name=nf,filename=${p('nob.qcow2')}`,
    JSON.stringify({ driver: 'qcow2', 'node-name': 'n', file: 'nf', backing: null }),
    'driver=throttle,node-name=th,file=t,throttle-group=g',
    'driver=null-co,node-name=z0',
    'driver=null-co,node-name=z1,size=65536',
    'driver=raw,node-name=ro,file=rf,offset=512,size=4096,read-only=on',
  ];
  return ['--object', 'throttle-group,id=g', ...blockdevs.flatMap((b) => ['--blockdev', b])];
}

type Info = Record<string, unknown>;

/** What `execute` answers on either daemon, one after the other on the same images. */
async function bothAnswer(execute: string): Promise<{ qsd: unknown; ours: unknown }> {
  const answers: unknown[] = [];
  for (const which of ['qsd', 'vm-disk'] as const) {
    const qmp = scratch.path(`${which}.qmp`);
    const args = [...monitorArgs(qmp), ...nodeArgs()];
    const p = which === 'qsd' ? await startQsd(args, qmp) : await scratch.serve(args);
    if (which === 'qsd') scratch.running.push(p);
    const { client } = await QmpTestClient.connect(qmp);
    await client.execute({ execute: 'qmp_capabilities' });
    const reply: QmpMessage = await client.execute({ execute });
    answers.push(reply.return ?? reply);
    await client.execute({ execute: 'quit' });
    await p.exited;
    client.close();
  }
  return { qsd: answers[0], ours: answers[1] };
}

/** `ours` cut down to the members QEMU's `theirs` has (recursively, for objects). */
function qemuMembers(ours: unknown, theirs: unknown): unknown {
  if (typeof theirs !== 'object' || theirs === null || Array.isArray(theirs)) return ours;
  if (typeof ours !== 'object' || ours === null) return ours;
  const o = ours as Info;
  return Object.fromEntries(
    Object.keys(theirs).map((k) => [k, qemuMembers(o[k], (theirs as Info)[k])]),
  );
}

describe('query-named-block-nodes and query-block, as qemu-storage-daemon 7.2', () => {
  it('answers the BlockDeviceInfo of each node as QEMU does', async () => {
    await images();
    const { qsd, ours } = await bothAnswer('query-named-block-nodes');
    // Nodes QEMU opens from a header get names of its own making (#block123).
    const named = (list: unknown) =>
      (list as Info[]).filter((n) => !String(n['node-name']).startsWith('#'));
    const theirs = named(qsd);
    const mine = named(ours);
    expect(mine.map((n) => n['node-name'])).toEqual(theirs.map((n) => n['node-name']));
    for (const [i, node] of theirs.entries()) {
      expect(qemuMembers(mine[i], node), String(node['node-name'])).toEqual(node);
    }
    // vm-disk's own members beyond QEMU's.
    expect(mine.find((n) => n['node-name'] === 'r')).toMatchObject({
      children: [expect.objectContaining({ child: 'file', 'node-name': 'rf' })],
    });
  });

  it('query-block lists no devices (qemu-storage-daemon has none)', async () => {
    await images();
    const { qsd, ours } = await bothAnswer('query-block');
    expect(qsd).toEqual([]);
    expect(ours).toEqual(qsd);
  });
});
