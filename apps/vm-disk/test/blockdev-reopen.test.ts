// blockdev-reopen side by side with qemu-storage-daemon 7.2: the same QMP sequence on both
// gives the same replies (read-only <-> read-write of a qcow2 node and the file it opened
// inline, 'backing' and 'file' pointed at other nodes, the refusals in QEMU's words) and
// the same images afterwards.
import { describe, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide as compare, makeChain } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-blockdev-reopen-');

const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 512k'],
  top: ['write -P 0x33 3M 64k'],
};

/** Each node's name and read-only flag (what both daemons answer alike), sorted. */
async function readOnly(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const nodes = m.return as { 'node-name': string; ro: boolean }[];
  m.return = nodes
    .map((n) => ({ 'node-name': n['node-name'], ro: n.ro }))
    .sort((a, b) => a['node-name'].localeCompare(b['node-name']));
}

const file = (name: string) => ({
  driver: 'file',
  'node-name': `${name}-file`,
  filename: scratch.path(`${name}.qcow2`),
});

/** base read-only over a file it opens inline; mid over a file node of its own, read-only. */
function args(): string[] {
  const blockdev = (o: unknown) => ['--blockdev', JSON.stringify(o)];
  return [
    ...blockdev({ driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: file('base') }),
    ...blockdev({ ...file('mid'), 'read-only': true }),
    ...blockdev({
      driver: 'qcow2',
      'node-name': 'mid',
      'read-only': true,
      backing: 'base',
      file: 'mid-file',
    }),
    ...blockdev({ driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: file('top') }),
  ];
}

/** The chain, and other.qcow2 (all 0x44) that no node opens until a scenario adds it. */
async function prepare(): Promise<void> {
  await makeChain(scratch, CHAIN);
  const other = scratch.path('other.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, CHAIN.size]);
  await run('qemu-io', ['-c', `write -P 0x44 0 ${CHAIN.size}`, other]);
}

function sideBySide(scenario: (r: Recorder) => Promise<void>) {
  return compare(scratch, { prepare, args, scenario, results: ['top.qcow2'] });
}

/** block-job-cancel (force), then its BLOCK_JOB_CANCELLED, which may come before the reply. */
async function cancel(r: Recorder, device: string): Promise<void> {
  const from = r.seen.length;
  await r.cmd('block-job-cancel', { device, force: true });
  if (!r.seen.slice(from).some((m) => m.event === 'BLOCK_JOB_CANCELLED')) {
    await r.until('BLOCK_JOB_CANCELLED');
  }
}

/**
 * Starts a job held before finalize and waits until it is pending; its events, which come
 * before or after the reply as fast as it copies, are recorded before the reply.
 */
async function pending(r: Recorder, execute: string, args: Record<string, unknown>) {
  const from = r.seen.length;
  await r.cmd(execute, args);
  if (!r.seen.slice(from).some((m) => m.event === 'BLOCK_JOB_PENDING')) {
    await r.until('BLOCK_JOB_PENDING');
  }
  const tail = r.seen.splice(from);
  r.seen.push(...tail.filter((m) => 'event' in m), ...tail.filter((m) => !('event' in m)));
}

const addOther = (r: Recorder) =>
  r.cmd('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'other',
    'read-only': true,
    file: file('other'),
  });

/** Each node's children as query-named-block-nodes (flat) tells them, sorted. */
async function links(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes', { flat: true });
  const nodes = m.return as {
    'node-name': string;
    file: string;
    backing_file?: string;
    backing_file_depth: number;
    image: { 'backing-filename'?: string; 'backing-image'?: unknown };
  }[];
  m.return = nodes
    .map((n) => ({
      'node-name': n['node-name'],
      file: n.file,
      backing_file: n.backing_file,
      depth: n.backing_file_depth,
      header: n.image['backing-filename'],
      chain: n.image['backing-image'] !== undefined,
    }))
    .sort((a, b) => a['node-name'].localeCompare(b['node-name']));
}

const reopen = (r: Recorder, ...options: unknown[]) => r.cmd('blockdev-reopen', { options });

describe('blockdev-reopen against qemu-storage-daemon 7.2', () => {
  it('read-only <-> read-write: inline children follow, named ones are refused, then both at once', async () => {
    await sideBySide(async (r) => {
      await readOnly(r);
      // Refused: the file kept by name keeps its read-only unless base's options set it.
      const base = { driver: 'qcow2', 'node-name': 'base', file: 'base-file' };
      await reopen(r, base);
      await reopen(r, { ...base, 'read-only': false });
      await readOnly(r);
      await reopen(r, { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: 'mid-file' });
      await reopen(
        r,
        { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: 'mid-file' },
        file('mid'),
      );
      await readOnly(r);
      await reopen(r, {
        driver: 'qcow2',
        'node-name': 'base',
        'read-only': true,
        file: 'base-file',
      });
      await readOnly(r);
    });
  });

  it('what may not change is refused in QEMU words', async () => {
    await sideBySide(async (r) => {
      const top = { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: 'top-file' };
      await reopen(r, { ...top, driver: 'raw' });
      await reopen(r, { ...top, 'node-name': 'nope' });
      const { 'node-name': _, ...unnamed } = top;
      await reopen(r, unnamed);
      const { file: __, ...fileless } = top;
      await reopen(r, fileless);
      const { backing: ___, ...backingless } = top;
      await reopen(r, backingless);
      await reopen(r, { ...file('top'), filename: scratch.path('mid.qcow2') });
      await reopen(r, { ...file('top'), locking: 'off' });
      await reopen(r, { ...file('top'), aio: 'threads' });
      await reopen(r, { ...file('top'), 'read-only': true });
      await reopen(r, { ...top, 'read-only': true, 'force-share': true });
      await reopen(r, { ...top, 'lazy-refcounts': true });
      await readOnly(r);
    });
  });

  it("points 'backing' and 'file' at other nodes as QEMU 7.2 does; top then reads its new backing", async () => {
    await sideBySide(async (r) => {
      await addOther(r);
      const top = { driver: 'qcow2', 'node-name': 'top', file: 'top-file' };
      await reopen(r, { ...top, backing: 'other' });
      await links(r);
      await reopen(r, { ...top, backing: 'top' }); // a cycle
      await reopen(r, { ...top, backing: 'nope' });
      await reopen(r, { ...top, backing: 'mid', file: 'other-file' }); // other does not share writes
      await reopen(r, top); // the header names a backing file: it must be given
      await r.cmd('blockdev-del', { 'node-name': 'mid' });
      await reopen(r, { ...top, backing: null });
      await links(r);
      await reopen(r, { ...top, backing: 'other' });
      // Streamed whole: top gets what 'other' holds under its own data, as qsd's does.
      await r.cmd('block-stream', { 'job-id': 's0', device: 'top' });
      await r.until('BLOCK_JOB_COMPLETED');
      await links(r);
    });
  });

  it('a filter put between a format and its file by reopen, and taken out again', async () => {
    await sideBySide(async (r) => {
      await r.cmd('blockdev-add', { driver: 'blkdebug', 'node-name': 'dbg', image: 'top-file' });
      const top = { driver: 'qcow2', 'node-name': 'top', backing: 'mid' };
      await reopen(r, { ...top, file: 'dbg' });
      await links(r);
      await r.cmd('blockdev-del', { 'node-name': 'dbg' }); // in use
      await reopen(r, { ...top, file: 'top-file' });
      await r.cmd('blockdev-del', { 'node-name': 'dbg' });
      await links(r);
    });
  });

  it("a job's links: its implicit filter cannot be replaced, its frozen links cannot change", async () => {
    // Each job waited for in 'pending' (held before finalize: the filter in place and the
    // links frozen, however fast the job copies): a job still running would pause and
    // resume around each reopen (job-drain.test.ts), or not, as the copy's speed goes.
    const held = { 'auto-finalize': false };
    await sideBySide(async (r) => {
      await addOther(r);
      const top = { driver: 'qcow2', 'node-name': 'top', file: 'top-file' };
      await pending(r, 'block-commit', {
        'job-id': 'c0',
        device: 'top',
        'top-node': 'mid',
        'base-node': 'base',
        ...held,
      });
      await reopen(r, { ...top, backing: 'mid' }); // below the implicit commit_top: no change
      await reopen(r, { ...top, backing: 'other' });
      await cancel(r, 'c0');
      await pending(r, 'block-stream', {
        'job-id': 's0',
        device: 'top',
        'base-node': 'base',
        ...held,
      });
      await reopen(r, { ...top, backing: 'other' });
      await reopen(r, { ...top, backing: null });
      // The link into base stays free (QEMU freezes down to base's overlay).
      await reopen(r, {
        driver: 'qcow2',
        'node-name': 'mid',
        'read-only': true,
        backing: null,
        file: 'mid-file',
      });
      await cancel(r, 's0');
    });
  }, 120_000);
});
