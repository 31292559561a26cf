// Block jobs around drained graph changes, side by side with qemu-storage-daemon 7.2: a
// blockdev-reopen drains the subtrees of the nodes it reopens, and QEMU pauses every job
// with a node in them (child_job_drained_begin -> job_pause) until the change is done, so
// a running job sends JOB_STATUS_CHANGE 'paused' then 'running' (a ready one 'standby' then
// 'ready') before the reply. A job over other nodes, a job already paused by the user and
// a job that has finished its work (pending) send nothing.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import { bare, type Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-job-drain-');

// Enough data that a job at speed 1 never ends while the test runs (QEMU's jobs copy one
// chunk at each resume, the rate-limit sleep cut short).
const CHAIN = {
  size: '16M',
  base: ['write -P 0x11 0 8M'],
  mid: ['write -P 0x22 8M 4M'],
  top: ['write -P 0x33 15M 64k'],
};

const file = (name: string) => ({
  driver: 'file',
  'node-name': `${name}-file`,
  filename: scratch.path(`${name}.qcow2`),
});

const TOP = { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: 'top-file' };
const TGT = { driver: 'qcow2', 'node-name': 'tgt', file: 'tgt-file' };
const OTHER = { driver: 'qcow2', 'node-name': 'other', file: 'other-file' };

function args(): string[] {
  const blockdev = (o: unknown) => ['--blockdev', JSON.stringify(o)];
  return [
    ...blockdev(file('base')),
    ...blockdev({ driver: 'qcow2', 'node-name': 'base', file: 'base-file' }),
    ...blockdev(file('mid')),
    ...blockdev({ driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: 'mid-file' }),
    ...blockdev(file('top')),
    ...blockdev(TOP),
    ...blockdev(file('tgt')),
    ...blockdev(TGT),
    ...blockdev(file('other')),
    ...blockdev(OTHER),
  ];
}

async function prepare(): Promise<void> {
  await makeChain(scratch, CHAIN);
  for (const img of ['tgt', 'other']) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path(`${img}.qcow2`), '16M']);
  }
}

/** How far a rate-limited job got differs (QEMU copies a chunk at each resume): not compared. */
function withoutProgress(m: QmpMessage): QmpMessage {
  const b = bare(m);
  const data = b.data as Record<string, unknown> | undefined;
  if (typeof b.event === 'string' && b.event.startsWith('BLOCK_JOB_') && data) {
    const { offset: _, len: __, ...rest } = data;
    b.data = rest;
  }
  return b;
}

function sideBySide(scenario: (r: Recorder) => Promise<void>) {
  return compare(scratch, {
    prepare,
    args,
    scenario,
    results: ['other.qcow2'],
    bare: withoutProgress,
  });
}

/** Whether `m` is that event (of that status). */
const isEvent = (m: QmpMessage, event: string, status?: string) =>
  m.event === event && (status === undefined || (m.data as { status?: string }).status === status);

/**
 * Sends a command after which a job changes status now or a little later (QEMU runs the
 * job's coroutine at once or from its main loop: either order comes): waits for `event`,
 * then records the command's events before its reply.
 */
async function settled(
  r: Recorder,
  execute: string,
  args: Record<string, unknown>,
  event: string,
  status?: string,
): Promise<void> {
  const from = r.seen.length;
  await r.cmd(execute, args);
  if (!r.seen.slice(from).some((m) => isEvent(m, event, status))) await r.until(event, status);
  const tail = r.seen.splice(from);
  r.seen.push(...tail.filter((m) => 'event' in m), ...tail.filter((m) => !('event' in m)));
}

/** Force-cancels `id` and waits until it is gone. */
const cancel = (r: Recorder, id: string) =>
  settled(r, 'block-job-cancel', { device: id, force: true }, 'JOB_STATUS_CHANGE', 'null');

const reopen = (r: Recorder, ...options: unknown[]) => r.cmd('blockdev-reopen', { options });

describe('block jobs around drained graph changes, against qemu-storage-daemon 7.2', () => {
  it('a running stream: paused and running again around a reopen of its nodes and what is below them', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top', speed: 1 });
      await reopen(r, TOP);
      await reopen(r, file('top')); // below the job's node: drained through its parent
      await reopen(r, { driver: 'qcow2', 'node-name': 'base', file: 'base-file' });
      await reopen(r, OTHER); // no node of the job: nothing
      // Refused changes drain too.
      await reopen(r, { ...TOP, backing: 'other' });
      await reopen(r, { ...TOP, 'read-only': true });
      await r.cmd('query-jobs', undefined, ['current-progress', 'total-progress']);
      await cancel(r, 's0');
    });
  }, 120_000);

  it('a running intermediate commit: its overlay is one of its nodes', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-commit', {
        'job-id': 'c0',
        device: 'top',
        'top-node': 'mid',
        'base-node': 'base',
        speed: 1,
      });
      await reopen(r, TOP);
      await reopen(r, file('base'));
      await reopen(r, OTHER);
      await cancel(r, 'c0');
    });
  }, 120_000);

  it('a stream of mid: a reopen of top drains its subtree, down to the job; one of top-file does not', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's1', device: 'mid', speed: 1 });
      await reopen(r, TOP);
      await reopen(r, file('top'));
      await cancel(r, 's1');
    });
  }, 120_000);

  it('a ready mirror: standby and ready again, for its source and its target', async () => {
    await sideBySide(async (r) => {
      const mirror = { 'job-id': 'm0', device: 'top', target: 'tgt', sync: 'top' };
      await settled(r, 'blockdev-mirror', mirror, 'BLOCK_JOB_READY');
      await reopen(r, TOP);
      await reopen(r, TGT);
      await reopen(r, OTHER);
      await r.cmd('query-block-jobs', undefined, ['offset', 'len']);
      await cancel(r, 'm0');
    });
  }, 120_000);

  it('a job paused by the user stays paused, without events, until resumed', async () => {
    await sideBySide(async (r) => {
      const mirror = { 'job-id': 'm0', device: 'top', target: 'tgt', sync: 'top' };
      await settled(r, 'blockdev-mirror', mirror, 'BLOCK_JOB_READY');
      await settled(r, 'job-pause', { id: 'm0' }, 'JOB_STATUS_CHANGE', 'standby');
      await reopen(r, TOP);
      await r.cmd('job-resume', { id: 'm0' });
      await reopen(r, TOP);
      await cancel(r, 'm0');
    });
  }, 120_000);

  it('a pending job (auto-finalize off) is not paused', async () => {
    await sideBySide(async (r) => {
      const stream = { 'job-id': 'p0', device: 'top', 'base-node': 'mid', 'auto-finalize': false };
      await settled(r, 'block-stream', stream, 'BLOCK_JOB_PENDING');
      await reopen(r, TOP);
      // QEMU's stream with nothing to stream never sets its length: 0/0; vm-disk's 16M/16M.
      await r.cmd('query-block-jobs', undefined, ['len', 'offset']);
      await settled(r, 'job-finalize', { id: 'p0' }, 'JOB_STATUS_CHANGE', 'null');
    });
  }, 120_000);
});
