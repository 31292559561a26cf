// Block jobs around drained graph changes, side by side with qemu-storage-daemon 7.2: a
// blockdev-reopen drains the subtrees of the nodes it reopens, and QEMU pauses every job
// with a node in them (child_job_drained_begin -> job_pause) until the change is done, so
// a running job sends JOB_STATUS_CHANGE 'paused' then 'running' (a ready one 'standby' then
// 'ready') before the reply. A job over other nodes, a job already paused by the user and
// a job that has finished its work (pending) send nothing.
//
// The other commands that drain, found side by side (every event before the reply):
// - a BlockBackend letting go of its node (block-export-del; a block-export-add failing
//   after the export's backend was attached: NBD server not running, a name in use, a
//   bitmap not found, resize unshared under a parent that needs it, a vhost-user-blk
//   option refused) drains the node twice
//   (the node and its parents: a job over the node or above it pauses, one below it does
//   not): two pairs of events. Attaching drains nothing, nor does an attach refused.
// - transaction, blockdev-snapshot and blockdev-snapshot-sync (a transaction of one
//   action) drain every node first (bdrv_drain_all): every job pauses and resumes once;
//   a snapshot then drains its node until the action's clean: a second pair for a job
//   over it (refused: the node is busy).
// - blockdev-add and blockdev-del of other nodes, and block_resize, drain no job's node:
//   block_resize refuses a job's node and a backing node before it drains, and no job
//   shares 'resize' of a node below its own.
import { rmSync } from 'node:fs';
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
  rmSync(scratch.path('snap.qcow2'), { force: true });
  for (const img of ['tgt', 'other', 'ov']) {
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

const nbdServer = (r: Recorder) =>
  r.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: scratch.path('nbd.sock') } } });

/** An NBD export of `node` added, then removed. */
async function exportAddDel(r: Recorder, id: string, node: string): Promise<void> {
  await r.cmd('block-export-add', { type: 'nbd', id, 'node-name': node });
  await r.cmd('block-export-del', { id });
}

const ov = () => ({ driver: 'qcow2', 'node-name': 'ov', file: file('ov') });

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

  it('block-export-add and -del over a running stream: two pairs as the backend goes, none as it comes', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top', speed: 1 });
      // Fails after the backend was attached: drained as it goes.
      await r.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'top' });
      await nbdServer(r);
      await exportAddDel(r, 'e1', 'top');
      await exportAddDel(r, 'e2', 'base'); // below the job's node: drains its parents
      await exportAddDel(r, 'e3', 'other'); // no node of the job: nothing
      await r.cmd('block-export-add', { type: 'nbd', id: 'x', 'node-name': 'other', name: 'x' });
      await r.cmd('block-export-add', { type: 'nbd', id: 'e4', 'node-name': 'top', name: 'x' });
      await r.cmd('block-export-add', {
        type: 'nbd',
        id: 'e5',
        'node-name': 'top',
        bitmaps: ['nope'],
      });
      // top (read-write for the stream) needs 'resize' of its file: refused as the export
      // unshares it, after the backend was attached.
      await r.cmd('block-export-add', { type: 'nbd', id: 'e6', 'node-name': 'top-file' });
      await r.cmd('query-block-exports');
      await cancel(r, 's0');
    });
  }, 120_000);

  it('vhost-user-blk exports: the same two pairs as the backend goes, its options refused after it came', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top', speed: 1 });
      const vhost = (id: string, more: Record<string, unknown> = {}) =>
        r.cmd('block-export-add', {
          type: 'vhost-user-blk',
          id,
          'node-name': 'top',
          addr: { type: 'unix', path: scratch.path(`${id}.sock`) },
          ...more,
        });
      await vhost('v0', { 'logical-block-size': 100 });
      await vhost('v1', { 'num-queues': 0 });
      await vhost('v2', { addr: { type: 'inet', host: '127.0.0.1', port: '1' } });
      await vhost('v4');
      await r.cmd('block-export-del', { id: 'v4' });
      await cancel(r, 's0');
    });
  }, 120_000);

  it('a ready mirror: standby and ready twice as an export of its source goes', async () => {
    await sideBySide(async (r) => {
      await nbdServer(r);
      const mirror = { 'job-id': 'm0', device: 'top', target: 'tgt', sync: 'top' };
      await settled(r, 'blockdev-mirror', mirror, 'BLOCK_JOB_READY');
      await exportAddDel(r, 'e1', 'top');
      await cancel(r, 'm0');
    });
  }, 120_000);

  it('a stream of mid: an export of top, above the job, drains nothing of it; one refused on base-file does', async () => {
    await sideBySide(async (r) => {
      await nbdServer(r);
      await r.cmd('block-stream', { 'job-id': 's1', device: 'mid', speed: 1 });
      await exportAddDel(r, 'e0', 'top');
      await r.cmd('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'base-file' });
      await cancel(r, 's1');
    });
  }, 120_000);

  it('a paused and a pending job: no events for exports, transactions or snapshots', async () => {
    await sideBySide(async (r) => {
      await nbdServer(r);
      const mirror = { 'job-id': 'm0', device: 'top', target: 'tgt', sync: 'top' };
      await settled(r, 'blockdev-mirror', mirror, 'BLOCK_JOB_READY');
      await settled(r, 'job-pause', { id: 'm0' }, 'JOB_STATUS_CHANGE', 'standby');
      await exportAddDel(r, 'e0', 'top');
      await r.cmd('transaction', { actions: [] });
      await r.cmd('blockdev-snapshot', { node: 'top', overlay: 'other' });
      await r.cmd('job-resume', { id: 'm0' });
      await cancel(r, 'm0');
      const stream = { 'job-id': 'p0', device: 'top', 'base-node': 'mid', 'auto-finalize': false };
      await settled(r, 'block-stream', stream, 'BLOCK_JOB_PENDING');
      await exportAddDel(r, 'e1', 'top');
      await r.cmd('transaction', { actions: [] });
      await settled(r, 'job-finalize', { id: 'p0' }, 'JOB_STATUS_CHANGE', 'null');
    });
  }, 120_000);

  it('transaction and snapshots: every job pauses once; a snapshot of its node a second time', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top', speed: 1 });
      await r.cmd('transaction', { actions: [] });
      const bitmap = { node: 'other', name: 'b0' };
      await r.cmd('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: bitmap }] });
      await r.cmd('transaction', { actions: [{ type: 'abort', data: {} }] });
      // Refused as the node is busy, after it was drained.
      await r.cmd('blockdev-snapshot', { node: 'top', overlay: 'other' });
      const sync = { 'snapshot-file': scratch.path('snap.qcow2'), 'snapshot-node-name': 'snap' };
      await r.cmd('blockdev-snapshot-sync', { 'node-name': 'top', ...sync });
      // The busy node is refused before the overlay's name is checked.
      await r.cmd('blockdev-snapshot-sync', {
        'node-name': 'top',
        ...sync,
        'snapshot-node-name': 'mid',
      });
      await r.cmd('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'other', name: 'b1' } },
          { type: 'blockdev-snapshot', data: { node: 'top', overlay: 'other' } },
        ],
      });
      await r.cmd('blockdev-add', ov()); // blockdev-add and -del drain no job's node
      await r.cmd('blockdev-del', { 'node-name': 'ov' });
      await r.cmd('blockdev-add', ov());
      await r.cmd('blockdev-snapshot', { node: 'other', overlay: 'ov' }); // no node of the job
      // One pair (QEMU then drops the new overlay, which nothing holds, at the clean: the
      // graph after it is not compared).
      await r.cmd('blockdev-snapshot-sync', { 'node-name': 'tgt', ...sync });
      await cancel(r, 's0');
    });
  }, 120_000);

  it('block_resize drains no job: a job node and a backing node are refused first, a file under a job by permissions', async () => {
    await sideBySide(async (r) => {
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top', speed: 1 });
      await r.cmd('block_resize', { 'node-name': 'other', size: 32 * 1024 * 1024 });
      await r.cmd('block_resize', { 'node-name': 'top', size: 32 * 1024 * 1024 });
      await r.cmd('block_resize', { 'node-name': 'base', size: 32 * 1024 * 1024 });
      await r.cmd('block_resize', { 'node-name': 'top-file', size: 32 * 1024 * 1024 });
      await cancel(r, 's0');
    });
  }, 120_000);
});
