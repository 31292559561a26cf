// Active commit (block-commit with top = the active layer) side by side with
// qemu-storage-daemon 7.2: the same QMP sequence on both gives the same replies, events
// (in order, timestamps aside), graph (the implicit mirror_top above top during the job)
// and resulting images; then an active commit under live writes through top's export,
// completed, with every acknowledged write in base afterwards.
import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import type { QmpMessage } from './harness/qmp-client.ts';
import { monitorArgs, Recorder } from './harness/qmp-recorder.ts';
import {
  chainBlockdevs,
  sideBySide as compare,
  makeChain as makeChainIn,
} from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-commit-active-');
const MiB = 1 << 20;

/** base (0x11 at 0-1M) <- mid (0x22 at 1M+512k) <- top (0x33 at 3M+64k), 4 MiB, qcow2. */
const CHAIN = {
  size: '4M',
  base: ['write -P 0x11 0 1M'],
  mid: ['write -P 0x22 1M 512k'],
  top: ['write -P 0x33 3M 64k', 'write -z 512k 64k'],
};
const makeChain = () => makeChainIn(scratch, CHAIN);

const chainArgs = (): string[] => chainBlockdevs(scratch);

/**
 * query-named-block-nodes as compared: each format or filter node's name (implicit ones
 * as '#'), driver, read-only flag and backing node, sorted.
 */
async function graphOf(r: Recorder): Promise<void> {
  const reply = await r.client.execute({ execute: 'query-named-block-nodes' });
  const nodes = reply.return as Record<string, unknown>[];
  const name = (n: string | undefined) => (n?.startsWith('#') ? '#' : n);
  const shown = nodes
    .filter((n) => n.drv !== 'file')
    .map((n) => {
      const image = n.image as { filename: string };
      return `${name(n['node-name'] as string)} ${n.drv} ro=${n.ro} ${fileOf(image.filename)}`;
    })
    .sort();
  r.seen.push({ return: shown } as QmpMessage);
}

/** An image's file name (QEMU shows a node with options as json:{..., "filename": ...}). */
const fileOf = (filename: string): string => /([^/"]+)"?\}*$/.exec(filename)?.[1] ?? filename;

/** Runs `scenario` on qemu-storage-daemon then vm-disk; compares sessions and images. */
async function sideBySide(scenario: (r: Recorder) => Promise<void>): Promise<void> {
  await compare(scratch, {
    prepare: makeChain,
    args: chainArgs,
    scenario,
    results: ['base.qcow2', 'top.qcow2'],
  });
}

describe('active commit against qemu-storage-daemon 7.2', () => {
  it('a 3-deep chain: errors, ready, busy nodes, complete; base after', async () => {
    await sideBySide(async (r) => {
      const c = { 'job-id': 'c', device: 'top' };
      await r.cmd('block-commit', { ...c, 'backing-file': 'x.qcow2' });
      await r.cmd('block-commit', { ...c, 'base-node': 'top' });
      await r.cmd('block-commit', c);
      await r.until('BLOCK_JOB_READY');
      await graphOf(r);
      await r.cmd('query-block-jobs');
      await r.cmd('block-commit', { ...c, 'job-id': 'c2' });
      await r.cmd('block-stream', { 'job-id': 's', device: 'top' });
      await r.cmd('block-job-complete', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await graphOf(r);
      await r.cmd('query-block-jobs');
    });
  });

  it('cancelled before and after ready: top stays in use, base holds a consistent copy', async () => {
    await sideBySide(async (r) => {
      // Progress this early depends on how far the job got (its dirty bitmap may not be
      // set up yet): len and offset are left out.
      await r.cmd('block-commit', { 'job-id': 'c', device: 'top', speed: 1 });
      await r.cmd('query-block-jobs', undefined, ['len', 'offset', 'busy']);
      await r.cmd('block-job-cancel', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      for (const m of r.seen) {
        if (m.event === 'BLOCK_JOB_CANCELLED') {
          const { len: _l, offset: _o, ...rest } = m.data as Record<string, unknown>;
          m.data = rest;
        }
      }
      await graphOf(r);
      await r.cmd('block-commit', {
        'job-id': 'c',
        device: 'top',
        'base-node': 'mid',
        'filter-node-name': 'ct',
      });
      await r.until('BLOCK_JOB_READY');
      await graphOf(r);
      await r.cmd('block-job-cancel', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await graphOf(r);
      await r.cmd('block-commit', { 'job-id': 'c', device: 'top' });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('block-job-complete', { device: 'c' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    });
  });
});

describe('active commit under live I/O', () => {
  it('every write acknowledged through the export of top is in base after complete', async () => {
    const p = scratch.path.bind(scratch);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('base.qcow2'), '64M']);
    await run('qemu-io', ['-c', 'write -P 0x11 0 8M', p('base.qcow2')]);
    const overlay = (backing: string, file: string) =>
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', p(file)]);
    await overlay('base.qcow2', 'mid.qcow2');
    await run('qemu-io', ['-c', 'write -P 0x22 8M 8M', p('mid.qcow2')]);
    await overlay('mid.qcow2', 'top.qcow2');
    await run('qemu-io', ['-c', 'write -P 0x33 16M 24M', p('top.qcow2')]);
    const qmp = p('a.qmp');
    const sock = p('a.sock');
    const d = await scratch.serve([
      ...monitorArgs(qmp),
      ...chainArgs(),
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=top,name=disk,writable=on',
    ]);
    const r = await Recorder.open(qmp);
    const io = await QemuIoSession.open(['-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    const writes: [number, number][] = [];
    let n = 0;
    const write = async (): Promise<void> => {
      n++;
      // Over mid's and top's committed data, crossing granules, never overlapping.
      const offset = 12 * MiB + n * 3 * 65536 + (n % 7) * 4096;
      const out = await io.command(`write -P ${n} ${offset} 64k`);
      expect(out).toContain('wrote 65536/65536');
      writes.push([n, offset]);
    };
    // Slow enough that writes land while the copy runs.
    expect(await r.cmd('block-commit', { 'job-id': 'c', device: 'top', speed: 4 * MiB })).toEqual({
      return: {},
    });
    for (let i = 0; i < 10; i++) await write();
    // 32 MiB at 4 MiB/s: those writes landed while the copy ran.
    const jobs = await r.cmd('query-block-jobs');
    expect((jobs.return as { ready: boolean }[])[0]!.ready).toBe(false);
    await r.cmd('block-job-set-speed', { device: 'c', speed: 0 });
    for (let i = 0; i < 5; i++) await write();
    await r.until('BLOCK_JOB_READY');
    for (let i = 0; i < 5; i++) await write();
    const pivot = r.cmd('block-job-complete', { device: 'c' });
    // A write in flight across the pivot (qemu-io runs one command at a time): not lost.
    await Promise.all([pivot, write()]);
    await r.until('JOB_STATUS_CHANGE', 'null');
    // The export now writes to base.
    for (let i = 0; i < 5; i++) await write();
    await io.command('flush');
    await io.kill();
    expect(r.seen.filter((m) => 'error' in m)).toEqual([]);
    await r.cmd('quit');
    await d.exited;
    r.client.close();
    const cmds = [
      '-c',
      'read -P 0x11 0 8M',
      '-c',
      'read -P 0x22 8M 4M',
      '-c',
      'read -P 0x33 18M 22M',
    ];
    for (const [pat, off] of writes) cmds.push('-c', `read -P ${pat} ${off} 64k`);
    const out = await run('qemu-io', ['-r', '-f', 'qcow2', ...cmds, p('base.qcow2')]);
    expect(out).not.toMatch(/Pattern verification failed/);
    await run('qemu-img', ['check', p('base.qcow2')]);
  });
});
