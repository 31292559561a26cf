// block-set-write-threshold and BLOCK_WRITE_THRESHOLD side by side with qemu-storage-daemon
// 7.2: the same replies, the same events (amount exceeded, on the node the threshold is set
// on: a format node in guest offsets, its file node in host offsets) and write_threshold
// in query-named-block-nodes, with writes made over an NBD export by qemu-io.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-write-threshold-');

async function prepare(): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path('q.qcow2'), '64M']);
}

function args(): string[] {
  return [
    '--blockdev',
    `driver=file,node-name=f,filename=${scratch.path('q.qcow2')}`,
    '--blockdev',
    'driver=qcow2,node-name=q,file=f',
    '--nbd-server',
    `addr.type=unix,addr.path=${scratch.path('nbd.sock')}`,
    '--export',
    'type=nbd,id=e,node-name=q,writable=on',
  ];
}

/** write_threshold of q and f in query-named-block-nodes. */
async function thresholds(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  m.return = (m.return as Record<string, unknown>[])
    .map((n) => ({ node: n['node-name'], write_threshold: n.write_threshold }))
    .sort((a, b) => String(a.node).localeCompare(String(b.node)));
}

async function io(r: Recorder, cmds: string[], events: number): Promise<void> {
  await run('qemu-io', [
    '-f',
    'raw',
    ...cmds.flatMap((c) => ['-c', c]),
    `nbd+unix:///q?socket=${scratch.path('nbd.sock')}`,
  ]);
  for (let i = 0; i < events; i++) await r.until('BLOCK_WRITE_THRESHOLD');
}

const set = (r: Recorder, node: string, t: unknown) =>
  r.cmd('block-set-write-threshold', { 'node-name': node, 'write-threshold': t });

describe('block-set-write-threshold as qemu-storage-daemon 7.2', () => {
  it('fires once per arming, on the node it is set on, and shows in the node list', async () => {
    await sideBySide(scratch, {
      prepare,
      args,
      results: ['q.qcow2'],
      scenario: async (r) => {
        await set(r, 'nope', 1);
        await set(r, 'q', 'x');
        await set(r, 'q', 1 << 20);
        // A 64 MiB host offset is never reached by these writes: no event for f.
        await set(r, 'f', 64 << 20);
        await thresholds(r);
        // Below the threshold: nothing; then beyond it: one event, then it is off.
        await io(r, ['write -P 1 0 64k'], 0);
        await io(r, ['write -P 2 4M 64k', 'write -P 3 6M 64k'], 1);
        await thresholds(r);
        // Write-zeroes counts too.
        await set(r, 'q', 2 << 20);
        await io(r, ['write -z 8M 64k'], 1);
        // On the file node: host offsets (where the qcow2 puts its clusters).
        await set(r, 'f', 1 << 18);
        await io(r, ['write -P 4 16M 64k'], 1);
        await set(r, 'q', 0);
        await thresholds(r);
      },
    });
  });
});
