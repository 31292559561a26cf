// Block jobs under live I/O: while a stream or an intermediate commit runs (slowed by
// `speed`), a client writes patterns through the NBD export of the top node and reads each
// back (qemu-io over nbd+unix), some behind the job's position and some ahead of it. After
// the job every acknowledged write is there: read back over NBD, and the chain compared
// (qemu-img compare) with a raw reference that got the same writes; every layer checks clean.
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';
import { monitorArgs } from './harness/qmp-recorder.ts';
import { chainBlockdevs, makeChain as makeChainIn } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-block-job-live-io-');
const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 8 * MiB;

/** base (0x11 at 0-1M and 6-8M) <- mid (0x22 at 1-6M) <- top (0x33 at 3M+512k), qcow2. */
const makeChain = () =>
  makeChainIn(scratch, {
    size: `${SIZE}`,
    base: ['write -P 0x11 0 1M', 'write -P 0x11 6M 2M'],
    mid: ['write -P 0x22 1M 5M'],
    top: ['write -P 0x33 3M 512k'],
  });

const serveArgs = (qmp: string, nbd: string) => {
  return [
    ...monitorArgs(qmp),
    ...chainBlockdevs(scratch),
    '--nbd-server',
    `addr.type=unix,addr.path=${nbd}`,
    '--export',
    'type=nbd,id=e0,node-name=top,name=disk,writable=on',
  ];
};

interface Write {
  offset: number;
  length: number;
  pattern: number;
}

/** A qemu-io command line on the export, or on the raw reference. */
async function qemuIo(target: 'export' | 'reference', commands: string[]): Promise<string> {
  const args = commands.flatMap((c) => ['-c', c]);
  const out =
    target === 'export'
      ? await run('qemu-io', [
          '-f',
          'raw',
          ...args,
          `nbd+unix:///disk?socket=${scratch.path('nbd.sock')}`,
        ])
      : await run('qemu-io', ['-f', 'raw', ...args, scratch.path('reference.raw')]);
  expect(out).not.toMatch(/Pattern verification failed|error|failed/i);
  return out;
}

/** The job's position (bytes done) and length, or undefined once it is gone. */
async function position(
  client: QmpTestClient,
): Promise<{ offset: number; len: number } | undefined> {
  const r = await client.execute({ execute: 'query-block-jobs' });
  const [job] = r.return as { offset: number; len: number }[];
  return job;
}

/** Each layer of the chain under top.qcow2 checks clean. */
async function checkLayers(): Promise<string[]> {
  const info = JSON.parse(
    await run('qemu-img', ['info', '--backing-chain', '--output=json', scratch.path('top.qcow2')]),
  ) as { filename: string; format: string }[];
  for (const layer of info) {
    await run('qemu-img', ['check', '-q', '-f', layer.format, layer.filename]);
  }
  return info.map((l) => l.filename);
}

/**
 * Runs `job` slowed to `speed` while writing through the export: each round, one write
 * behind the job's position and one ahead of it, each read back at once. Then checks.
 */
async function underLiveIo(
  command: string,
  args: Record<string, unknown>,
  chainAfter: string[],
): Promise<void> {
  await makeChain();
  await run('qemu-img', [
    'convert',
    '-O',
    'raw',
    scratch.path('top.qcow2'),
    scratch.path('reference.raw'),
  ]);
  const qmp = scratch.path('qmp.sock');
  const p = await scratch.serve(serveArgs(qmp, scratch.path('nbd.sock')));
  const { client } = await QmpTestClient.connect(qmp);
  const writes: Write[] = [];
  try {
    expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
    expect(
      await client.execute({ execute: command, arguments: { ...args, speed: 1 * MiB } }),
    ).toEqual({ return: {} });
    let behind = 0;
    let ahead = 0;
    for (let round = 0; ; round++) {
      const pos = await position(client);
      if (!pos) break;
      // Cluster-sized and sub-cluster writes (copy on write in a cluster the job may copy).
      const length = round % 2 === 0 ? 64 * KiB : 12 * KiB;
      const skew = round % 2 === 0 ? 0 : 20 * KiB;
      const at = (o: number) => Math.min(SIZE - 64 * KiB, Math.max(0, o - (o % (64 * KiB)))) + skew;
      const targets: number[] = [];
      if (pos.offset >= 128 * KiB) {
        targets.push(at(pos.offset - 128 * KiB - ((round * 192 * KiB) % pos.offset)));
        behind++;
      }
      if (pos.offset + 1 * MiB < SIZE) {
        targets.push(
          at(pos.offset + 1 * MiB + ((round * 320 * KiB) % (SIZE - pos.offset - 1 * MiB))),
        );
        ahead++;
      }
      for (const offset of targets) {
        const w = { offset, length, pattern: 0x40 + (writes.length % 0x80) };
        writes.push(w);
        const cmd = `${w.offset} ${w.length}`;
        await qemuIo('export', [`write -P ${w.pattern} ${cmd}`, `read -P ${w.pattern} ${cmd}`]);
        await qemuIo('reference', [`write -P ${w.pattern} ${cmd}`]);
      }
    }
    expect(behind).toBeGreaterThanOrEqual(2);
    expect(ahead).toBeGreaterThanOrEqual(2);
    // Every write is there after the job (the ones a later write overlaps: in the compare).
    const overlaps = (a: Write, b: Write) =>
      a.offset < b.offset + b.length && b.offset < a.offset + a.length;
    const kept = writes.filter((w, i) => !writes.slice(i + 1).some((o) => overlaps(w, o)));
    await qemuIo(
      'export',
      kept.map((w) => `read -P ${w.pattern} ${w.offset} ${w.length}`),
    );
    expect(await client.execute({ execute: 'quit' })).toEqual({ return: {} });
  } finally {
    client.close();
  }
  expect(await p.exited).toBe(0);
  expect(await checkLayers()).toEqual(chainAfter.map((f) => scratch.path(f)));
  await run('qemu-img', [
    'compare',
    '-F',
    'raw',
    scratch.path('top.qcow2'),
    scratch.path('reference.raw'),
  ]);
}

describe('block jobs under live I/O through the NBD export', () => {
  it('block-stream: writes behind and ahead of the job are all there after it', async () => {
    await underLiveIo('block-stream', { 'job-id': 's', device: 'top' }, ['top.qcow2']);
  }, 120_000);

  it('intermediate block-commit: writes to the top are all there after it', async () => {
    await underLiveIo('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid' }, [
      'top.qcow2',
      'base.qcow2',
    ]);
  }, 120_000);
});
