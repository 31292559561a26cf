// The NBD client against its reference, fio's nbd engine (libnbd), in the same run and on
// the same nbdkit export over a unix socket, iodepth 32: 4 KiB random read (nbdkit
// pattern), 4 KiB random write (nbdkit memory) and 256 KiB sequential read. Prints each
// figure and ours / fio.
//
//   node bench/client.bench.ts        (BENCH_SECONDS=N to change the 3 s per run)

import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { NbdClient } from '../src/index.ts';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 3);
const DEPTH = 32;
const SIZE = 256 * 1024 * 1024;

interface Figure {
  iops: number;
  mibps: number;
}

async function startNbdkit(
  dir: string,
  name: string,
  args: string[],
): Promise<{ socket: string; proc: ChildProcess }> {
  const socket = join(dir, `${name}.sock`);
  const pid = join(dir, `${name}.pid`);
  const proc = spawn('nbdkit', ['-f', '-U', socket, '-P', pid, ...args], { stdio: 'ignore' });
  for (let i = 0; i < 400 && !existsSync(pid); i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(pid)) throw new Error(`nbdkit ${args.join(' ')} did not start`);
  return { socket, proc };
}

function fio(socket: string, rw: string, bs: number): Figure {
  const r = spawnSync(
    'fio',
    [
      '--name=ref',
      '--ioengine=nbd',
      `--uri=nbd+unix:///?socket=${socket}`,
      `--rw=${rw}`,
      `--bs=${bs}`,
      `--iodepth=${DEPTH}`,
      '--time_based',
      `--runtime=${SECONDS}`,
      '--output-format=json',
    ],
    { encoding: 'utf8' },
  );
  const out = r.stdout;
  const json = JSON.parse(out.slice(out.indexOf('{'))) as {
    jobs: { read: { iops: number; bw_bytes: number }; write: { iops: number; bw_bytes: number } }[];
  };
  const job = json.jobs[0]!;
  const side = rw.includes('write') ? job.write : job.read;
  return { iops: side.iops, mibps: side.bw_bytes / (1024 * 1024) };
}

async function ours(
  socket: string,
  kind: 'randread' | 'randwrite' | 'read',
  bs: number,
): Promise<Figure> {
  const c = await NbdClient.connect({ path: socket });
  const blocks = Math.floor(c.size / bs);
  const deadline = performance.now() + SECONDS * 1000;
  let ops = 0;
  let next = 0;
  const worker = async () => {
    const buf = Buffer.alloc(bs, 0x5a);
    while (performance.now() < deadline) {
      const block = kind === 'read' ? next++ % blocks : Math.floor(Math.random() * blocks);
      if (kind === 'randwrite') await c.write(block * bs, buf);
      else await c.read(block * bs, buf);
      ops++;
    }
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: DEPTH }, worker));
  const secs = (performance.now() - start) / 1000;
  await c.close();
  return { iops: ops / secs, mibps: (ops * bs) / secs / (1024 * 1024) };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vmdisk-nbd-client-bench-'));
  const procs: ChildProcess[] = [];
  try {
    const pattern = await startNbdkit(dir, 'pattern', ['pattern', `size=${SIZE}`]);
    const memory = await startNbdkit(dir, 'memory', ['memory', `${SIZE}`]);
    procs.push(pattern.proc, memory.proc);
    const rows: [string, Figure, Figure][] = [];
    rows.push([
      '4 KiB random read',
      await ours(pattern.socket, 'randread', 4096),
      fio(pattern.socket, 'randread', 4096),
    ]);
    rows.push([
      '4 KiB random write',
      await ours(memory.socket, 'randwrite', 4096),
      fio(memory.socket, 'randwrite', 4096),
    ]);
    rows.push([
      '256 KiB sequential read',
      await ours(pattern.socket, 'read', 262144),
      fio(pattern.socket, 'read', 262144),
    ]);
    const report = new BenchReport('client', 'NbdClient');
    for (const [name, a, b] of rows) {
      report.add(name, 'NbdClient', a.iops, 'IOPS');
      report.add(name, 'fio nbd (libnbd)', b.iops, 'IOPS');
    }
    report.note(`nbdkit on a unix socket, iodepth ${DEPTH}, ${SECONDS} s each`);
    report.flush();
  } finally {
    for (const p of procs) p.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
