// kill -9 of `vm-disk serve` in the middle of a block job: every layer checks clean after
// (qemu-img check), the chain reads as it did before the job (each job copies data that
// reads the same from where it lands; a mirror's target is a copy on the side), and the
// same job run again on a new daemon completes with the result an uninterrupted run gives.
// `speed` keeps the job mid-way; mirror and active commit are completed once ready.
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync, statSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';
import { monitorArgs } from './harness/qmp-recorder.ts';
import { chainBlockdevs, makeChain as makeChainIn } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-block-job-crash-');
const MiB = 1 << 20;
const SIZE = 8 * MiB;
/**
 * 4 KiB clusters (an L2 table maps 2 MiB) and caches of two tables: the job's allocations
 * evict metadata mid-way, so the kill finds some of it on disk and some not.
 */
const SMALL = ['-o', 'cluster_size=4096'];
const CACHES = 'l2-cache-size=8192,refcount-cache-size=16384';

/**
 * base (0x11 at 0-1M and 6-8M) <- mid (0x22 at 1-6M) <- top (0x33 at 3M+512k), 8 MiB times
 * `scale`, qcow2: the jobs allocate in the layer they write (stream in top, commit in base,
 * mirror in its target).
 */
const makeChain = (scale = 1) =>
  makeChainIn(scratch, {
    size: `${SIZE * scale}`,
    create: SMALL,
    base: [`write -P 0x11 0 ${scale}M`, `write -P 0x11 ${6 * scale}M ${2 * scale}M`],
    mid: [`write -P 0x22 ${scale}M ${5 * scale}M`],
    top: [`write -P 0x33 ${3 * scale}M ${scale * 512}k`],
  });

/** The size of the layer `name`'s file (0 if none): it grows as a job writes data clusters into it. */
const fileSize = (name: string): number =>
  existsSync(scratch.path(`${name}.qcow2`)) ? statSync(scratch.path(`${name}.qcow2`)).size : 0;

/**
 * After kill -9 a killed daemon's image files, and the locks on them, may stay open for a
 * moment after the process is reaped: io_uring's teardown runs asynchronously and drops
 * the files its requests held. Waits until qemu-img can take the locks of these layers
 * again (as a user restarting after a crash would retry), then the checks run.
 */
async function locksReleased(names: string[]): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (const name of names) {
    const path = scratch.path(`${name}.qcow2`);
    if (!existsSync(path)) continue;
    for (;;) {
      try {
        await run('qemu-img', ['info', path]);
        break;
      } catch (e) {
        if (Date.now() > deadline || !String(e).includes('lock')) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }
}

/** Bytes allocated in the layer `name` itself (as its metadata on disk says). */
async function ownBytes(name: string): Promise<number> {
  if (!existsSync(scratch.path(`${name}.qcow2`))) return 0;
  const map = JSON.parse(
    await run('qemu-img', ['map', '--output=json', scratch.path(`${name}.qcow2`)]),
  ) as { length: number; depth: number; data: boolean }[];
  return map.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
}

const chainArgs = () => chainBlockdevs(scratch, `${CACHES},`);

/**
 * Every layer of the chain under `top` checks without corruption or error. Leaked clusters
 * (allocated, their refcount written, but not yet in an L2 table on disk when killed) are
 * what qemu-storage-daemon leaves after kill -9 as well ("no harm to data"): counted only.
 */
async function checkLayers(top: string): Promise<number> {
  const info = JSON.parse(
    await run('qemu-img', ['info', '--backing-chain', '--output=json', top]),
  ) as { filename: string; format: string }[];
  let leaks = 0;
  for (const layer of info) {
    // Exit status 3: leaks only (2: corruption, 1: check failed).
    const r = spawnSync(
      'qemu-img',
      ['check', '--output=json', '-f', layer.format, layer.filename],
      {
        encoding: 'utf8',
      },
    );
    expect([0, 3], `${layer.filename}: ${r.stderr}`).toContain(r.status);
    const out = JSON.parse(r.stdout) as Record<string, number | undefined>;
    expect(out['check-errors']).toBe(0);
    expect(out.corruptions ?? 0).toBe(0);
    leaks += out.leaks ?? 0;
  }
  return leaks;
}

/** The chain of `image` as raw bytes (a file), and its backing chain (file names only). */
async function chainState(
  name: string,
  image = 'top.qcow2',
): Promise<{ raw: string; chain: string[] }> {
  const top = scratch.path(image);
  const raw = scratch.path(`${name}.raw`);
  await run('qemu-img', ['convert', '-O', 'raw', top, raw]);
  const info = JSON.parse(
    await run('qemu-img', ['info', '--backing-chain', '--output=json', top]),
  ) as { filename: string }[];
  return { raw, chain: info.map((l) => l.filename) };
}

interface Daemon {
  client: QmpTestClient;
  kill(): Promise<unknown>;
  /** quit, and the daemon's exit (its images written back). */
  quit(): Promise<unknown>;
}

async function startDaemon(): Promise<Daemon> {
  const qmp = scratch.path('vm-disk.qmp');
  const p = await scratch.serve([...monitorArgs(qmp), ...chainArgs()]);
  const { client } = await QmpTestClient.connect(qmp);
  expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
  return {
    client,
    kill: async () => {
      const status = await p.stop('SIGKILL');
      client.close();
      return status;
    },
    quit: async () => {
      expect(await client.execute({ execute: 'quit' })).toEqual({ return: {} });
      client.close();
      return p.exited;
    },
  };
}

/** Waits for a job's JOB_STATUS_CHANGE to `status` (events before it skipped). */
async function untilStatus(client: QmpTestClient, status: string): Promise<void> {
  for (;;) {
    const m = await client.next(60_000);
    const data = m.data as { status?: string } | undefined;
    if (m.event === 'JOB_STATUS_CHANGE' && data?.status === status) return;
  }
}

/** Polls query-block-jobs until the job has done at least `bytes` (and is not done). */
async function untilOffset(client: QmpTestClient, bytes: number): Promise<number> {
  for (;;) {
    const r = await client.execute({ execute: 'query-block-jobs' });
    const [job] = r.return as { offset: number; len: number; status: string }[];
    expect(job?.status).toBe('running');
    if (job!.offset >= bytes) {
      expect(job!.offset).toBeLessThan(job!.len);
      return job!.offset;
    }
  }
}

type Job = { command: string; arguments: Record<string, unknown> };

interface Case {
  job: Job;
  /** The layer (scratch name without .qcow2) the job writes. */
  written: string;
  /** The image whose chain is the job's result, and that chain (scratch names). */
  result: string;
  expectChain: string[];
  /** The job reaches ready and is completed then (mirror, active commit). */
  complete?: boolean;
  /** The chain's scale (makeChain). */
  scale?: number;
  /** The offset past which the daemon is killed. */
  killAt?: number;
}

/** Starts `job` and waits until it has concluded (completing it once ready if asked). */
async function runToEnd(d: Daemon, c: Case, args = c.job.arguments): Promise<void> {
  expect(await d.client.execute({ execute: c.job.command, arguments: args })).toEqual({
    return: {},
  });
  if (c.complete) {
    await untilStatus(d.client, 'ready');
    const id = args['job-id'];
    expect(
      await d.client.execute({ execute: 'block-job-complete', arguments: { device: id } }),
    ).toEqual({ return: {} });
  }
  await untilStatus(d.client, 'null');
}

/**
 * Runs the job without interruption on a fresh chain (what it should leave), then on another
 * fresh chain kills the daemon mid-way, checks, and runs it again to completion.
 */
async function killMidway(c: Case): Promise<void> {
  const scale = c.scale ?? 1;
  const size = SIZE * scale;
  await makeChain(scale);
  const before = await chainState('before');
  const sizeBefore = fileSize(c.written);
  const ownBefore = await ownBytes(c.written);
  let d = await startDaemon();
  await runToEnd(d, c);
  expect(await d.quit()).toBe(0);
  expect(await checkLayers(scratch.path(c.result))).toBe(0);
  const uninterrupted = await chainState('uninterrupted', c.result);
  expect(uninterrupted.chain).toEqual(c.expectChain.map((f) => scratch.path(f)));
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', before.raw, uninterrupted.raw]);

  await makeChain(scale);
  // A mirror's target from the run before: the job creates it anew.
  rmSync(scratch.path('mirror.qcow2'), { force: true });
  d = await startDaemon();
  const slow = { ...c.job.arguments, speed: 2 * MiB * scale };
  expect(await d.client.execute({ execute: c.job.command, arguments: slow })).toEqual({
    return: {},
  });
  // Past a first L2 table's worth of the job's writes (2 MiB), so that it was evicted.
  await untilOffset(d.client, c.killAt ?? 5 * MiB);
  expect(await d.kill()).toBe('SIGKILL');
  await locksReleased(['base', 'mid', 'top', c.written]);
  // The job had written data into the layer, and some of its metadata (evicted L2 tables
  // and refcount blocks), not all: the rest was only in the daemon's caches. (A mirror's
  // target has the default caches: none of its L2 tables need have been written.)
  expect(fileSize(c.written)).toBeGreaterThan(sizeBefore);
  const own = await ownBytes(c.written);
  if (c.written !== 'mirror') expect(own).toBeGreaterThan(ownBefore);
  expect(own).toBeLessThan(size);
  await checkLayers(scratch.path('top.qcow2'));
  await checkLayers(scratch.path(`${c.written}.qcow2`));
  const killed = await chainState('killed');
  expect(killed.chain).toEqual(before.chain);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', before.raw, killed.raw]);

  d = await startDaemon();
  await runToEnd(d, c);
  expect(await d.quit()).toBe(0);
  await checkLayers(scratch.path(c.result));
  const again = await chainState('again', c.result);
  expect(again.chain).toEqual(uninterrupted.chain);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uninterrupted.raw, again.raw]);
}

describe('kill -9 of vm-disk serve in the middle of a block job', () => {
  it('block-stream: no layer corrupt, the chain reads the same, and it runs again', async () => {
    await killMidway({
      job: { command: 'block-stream', arguments: { 'job-id': 's', device: 'top' } },
      written: 'top',
      result: 'top.qcow2',
      expectChain: ['top.qcow2'],
    });
  }, 120_000);

  it('intermediate block-commit: no layer corrupt, the chain reads the same, and it runs again', async () => {
    await killMidway({
      job: {
        command: 'block-commit',
        arguments: { 'job-id': 'c', device: 'top', 'top-node': 'mid' },
      },
      written: 'base',
      result: 'top.qcow2',
      expectChain: ['top.qcow2', 'base.qcow2'],
    });
  }, 120_000);

  it('drive-mirror: the source chain reads the same, the target checks clean, and it runs again', async () => {
    await killMidway({
      job: {
        command: 'drive-mirror',
        // buf-size 1 MiB: the rate limit holds the job after each MiB (16 MiB by default).
        arguments: {
          'job-id': 'm',
          device: 'top',
          target: scratch.path('mirror.qcow2'),
          format: 'qcow2',
          sync: 'full',
          'buf-size': MiB,
        },
      },
      written: 'mirror',
      result: 'mirror.qcow2',
      expectChain: ['mirror.qcow2'],
      complete: true,
    });
  }, 120_000);

  it('active block-commit: no layer corrupt, the chain reads the same, and it runs again', async () => {
    // Active commit copies 16 MiB (its default buf-size) per rate-limited step: a chain of
    // 64 MiB, killed after the second step.
    await killMidway({
      job: { command: 'block-commit', arguments: { 'job-id': 'c', device: 'top' } },
      written: 'base',
      result: 'base.qcow2',
      expectChain: ['base.qcow2'],
      complete: true,
      scale: 8,
      killAt: 20 * MiB,
    });
  }, 180_000);
});
