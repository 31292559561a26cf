// blockdev-mirror and drive-mirror over QMP, side by side with qemu-storage-daemon 7.2: the
// same QMP sequence on both gives the same replies, events (in order, timestamps aside,
// the implicit mirror_top's generated name aside) and resulting images.
import { rmSync } from 'node:fs';
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-mirror-');

/** A message as compared: no timestamp, generated node names (#block123) alike. */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage =>
  JSON.parse(JSON.stringify(rest).replace(/#block\d+/g, '#blockN')) as QmpMessage;

/** src: 4 MiB qcow2 with data at 0-1M and 3M+64k; dst: an empty 4 MiB qcow2. */
async function makeImages(): Promise<void> {
  const p = scratch.path.bind(scratch);
  for (const f of ['src.qcow2', 'dst.qcow2', 'new.qcow2']) rmSync(p(f), { force: true });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '4M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 64k', p('src.qcow2')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('dst.qcow2'), '4M']);
}

const daemonArgs = () => {
  const p = scratch.path.bind(scratch);
  return [
    '--blockdev',
    `driver=file,node-name=sf,filename=${p('src.qcow2')}`,
    '--blockdev',
    'driver=qcow2,node-name=src,file=sf',
    '--blockdev',
    `driver=file,node-name=df,filename=${p('dst.qcow2')}`,
    '--blockdev',
    'driver=qcow2,node-name=dst,file=df',
  ];
};

async function sideBySide(scenario: (r: Recorder) => Promise<void>, result: string): Promise<void> {
  await compare(scratch, {
    prepare: makeImages,
    args: daemonArgs,
    scenario,
    results: [result],
    bare,
  });
}

describe('mirror against qemu-storage-daemon 7.2', () => {
  it('blockdev-mirror: errors, ready, busy source, complete pivots; the target after', async () => {
    await sideBySide(async (r) => {
      const m = { 'job-id': 'm', device: 'src', target: 'dst', sync: 'full' };
      await r.cmd('blockdev-mirror', { ...m, target: 'src' });
      await r.cmd('blockdev-mirror', { ...m, target: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, device: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, granularity: 1000 });
      await r.cmd('blockdev-mirror', { ...m, granularity: 256 });
      await r.cmd('blockdev-mirror', { ...m, 'buf-size': -1 });
      await r.cmd('blockdev-mirror', { ...m, sync: 'incremental' });
      await r.cmd('blockdev-mirror', { ...m, sync: 'bitmap' });
      await r.cmd('block-job-complete', { device: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, granularity: 65536, 'buf-size': 1 << 20 });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('query-block-jobs');
      await r.cmd('blockdev-mirror', { ...m, 'job-id': 'm2' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    }, 'dst.qcow2');
  });

  it('blockdev-mirror sync none, then complete with nothing to copy', async () => {
    await sideBySide(async (r) => {
      // Ready before the reply: there is nothing to copy.
      await r.cmd('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'dst', sync: 'none' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'dst.qcow2');
  });

  it('drive-mirror to a new image, cancelled after ready: the copy is consistent', async () => {
    await sideBySide(async (r) => {
      const target = scratch.path('new.qcow2');
      await r.cmd('drive-mirror', {
        'job-id': 'm',
        device: 'src',
        target,
        sync: 'full',
        format: 'qcow2',
        'copy-mode': 'write-blocking',
      });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('query-block-jobs');
      await r.cmd('block-job-cancel', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'new.qcow2');
  });

  it('blockdev-mirror cancelled before ready, and completed with a named filter', async () => {
    await sideBySide(async (r) => {
      const m = { 'job-id': 'm', device: 'src', target: 'dst', sync: 'full' };
      await r.cmd('blockdev-mirror', { ...m, speed: 1 });
      await r.cmd('block-job-cancel', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('blockdev-mirror', { ...m, 'filter-node-name': 'mt' });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('blockdev-mirror', { ...m, 'job-id': 'x', device: 'mt' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'dst.qcow2');
  });
});
