// Benchmark of the NBD server: ours (NbdServer + FileTarget, in this process) against
// qemu-nbd and `nbdkit file` serving the same raw file, driven by fio's nbd engine at
// iodepth 32: 4 KiB random read, 4 KiB random write, 256 KiB sequential read. Then the
// resident memory of each server under 64 connections x 32 requests in flight.
//
// Run with plain node (it strips the types of ../src/index.ts).

import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { FileTarget, NbdServer } from '../src/index.ts';

const MiB = 1024 * 1024;
const IMAGE_MIB = Number(process.env.NBD_BENCH_IMAGE_MIB ?? 256);
const RUNTIME_S = Number(process.env.NBD_BENCH_RUNTIME ?? 3);

const dir = mkdtempSync(join(tmpdir(), 'vmdisk-nbd-bench-'));
const image = join(dir, 'bench.img');

function makeImage(): void {
  const fd = openSync(image, 'w');
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
  for (let i = 0; i < IMAGE_MIB; i++) writeSync(fd, chunk);
  closeSync(fd);
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect({ port, host: '127.0.0.1' }, () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nothing listening on ${port}`);
}

interface Workload {
  name: string;
  rw: string;
  bs: string;
}

const WORKLOADS: Workload[] = [
  { name: '4k randread', rw: 'randread', bs: '4k' },
  { name: '4k randwrite', rw: 'randwrite', bs: '4k' },
  { name: '256k seqread', rw: 'read', bs: '256k' },
];

interface FioResult {
  iops: number;
  mibps: number;
}

/** fio is run asynchronously so that our in-process server keeps serving. */
function fio(uri: string, w: Workload, extra: string[] = []): Promise<FioResult> {
  const args = [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    '--iodepth=32',
    `--size=${IMAGE_MIB}M`,
    '--time_based',
    `--runtime=${RUNTIME_S}`,
    '--ramp_time=1',
    '--output-format=json',
    ...extra,
  ];
  return new Promise((resolve, reject) => {
    const p = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => {
      out += d;
    });
    p.stderr.on('data', (d) => {
      err += d;
    });
    p.on('close', (code) => {
      if (code !== 0) return reject(new Error(`fio failed (${code}): ${err}`));
      const json = JSON.parse(out.slice(out.indexOf('{'))) as {
        jobs: Array<{
          read: { iops: number; bw_bytes: number };
          write: { iops: number; bw_bytes: number };
        }>;
      };
      let iops = 0;
      let bw = 0;
      for (const j of json.jobs) {
        iops += j.read.iops + j.write.iops;
        bw += j.read.bw_bytes + j.write.bw_bytes;
      }
      resolve({ iops, mibps: bw / MiB });
    });
  });
}

interface Server {
  name: string;
  uri: string;
  rss(): number;
  stop(): Promise<void>;
}

async function startOurs(): Promise<Server> {
  const target = await FileTarget.open(image);
  const server = new NbdServer({ maxConnections: 256 });
  server.addExport({ name: 'bench', target, writable: true });
  const addr = (await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number };
  return {
    name: 'ours',
    uri: `nbd://127.0.0.1:${addr.port}/bench`,
    rss: () => process.memoryUsage.rss(),
    stop: async () => {
      await server.close();
      await target.close();
    },
  };
}

async function startChild(
  name: string,
  cmd: string,
  args: (port: number) => string[],
): Promise<Server> {
  const port = await freePort();
  const child = spawn(cmd, args(port), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  try {
    await waitForPort(port);
  } catch (err) {
    child.kill();
    throw new Error(`${name} did not start: ${stderr}`, { cause: err });
  }
  return {
    name,
    uri: `nbd://127.0.0.1:${port}/bench`,
    rss: () => {
      const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
      const m = /VmRSS:\s+(\d+) kB/.exec(status);
      return m ? Number(m[1]) * 1024 : Number.NaN;
    },
    stop: () =>
      new Promise((resolve) => {
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

const qemuNbd = (): Promise<Server> =>
  startChild('qemu-nbd', 'qemu-nbd', (port) => [
    '-f',
    'raw',
    '-x',
    'bench',
    '-b',
    '127.0.0.1',
    '-p',
    String(port),
    '-e',
    '256',
    '-t',
    '--cache=writeback',
    '--aio=threads',
    image,
  ]);

const nbdkit = (): Promise<Server> =>
  startChild('nbdkit file', 'nbdkit', (port) => [
    '-f',
    '-i',
    '127.0.0.1',
    '-p',
    String(port),
    '-e',
    'bench',
    'file',
    image,
  ]);

/** RSS sampled while fio runs 64 jobs (one connection each) at iodepth 32. */
async function memoryUnderLoad(
  s: Server,
): Promise<{ before: number; peak: number; after: number }> {
  const before = s.rss();
  let peak = before;
  const timer = setInterval(() => {
    peak = Math.max(peak, s.rss());
  }, 100);
  await fio(s.uri, { name: 'mem', rw: 'randrw', bs: '4k' }, [
    '--numjobs=64',
    '--thread',
    '--group_reporting',
  ]);
  clearInterval(timer);
  const after = s.rss();
  return { before, peak, after };
}

const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;

const ROUNDS = Number(process.env.NBD_BENCH_ROUNDS ?? 2);

async function main(): Promise<void> {
  const versions = spawnSync('qemu-nbd', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0];
  console.log(
    `image ${IMAGE_MIB} MiB raw file in ${dir}; fio nbd engine, iodepth 32, ${RUNTIME_S} s per run, ` +
      `best of ${ROUNDS} rounds (the servers take turns, so that load from elsewhere hits all alike)`,
  );
  console.log(
    `references: ${versions}; ${spawnSync('nbdkit', ['--version'], { encoding: 'utf8' }).stdout.trim()}`,
  );
  makeImage();
  const servers = [await startOurs(), await qemuNbd(), await nbdkit()];
  const best = new Map<string, Map<string, FioResult>>(servers.map((s) => [s.name, new Map()]));
  const memory = new Map<string, Array<{ before: number; peak: number; after: number }>>();
  let heap = '';
  try {
    for (let round = 0; round < ROUNDS; round++) {
      for (const w of WORKLOADS) {
        for (const s of servers) {
          const r = await fio(s.uri, w);
          const prev = best.get(s.name)!.get(w.name);
          if (prev === undefined || r.iops > prev.iops) best.get(s.name)!.set(w.name, r);
        }
      }
    }
    for (const s of servers) {
      // Twice: flat means the second run ends where the first did.
      memory.set(s.name, [await memoryUnderLoad(s), await memoryUnderLoad(s)]);
      if (s.name === 'ours') {
        const m = process.memoryUsage();
        heap = `ours after the load: V8 heap ${mib(m.heapTotal)} (used ${mib(m.heapUsed)}), array buffers ${mib(m.arrayBuffers)}, external ${mib(m.external)}`;
      }
    }
  } finally {
    for (const s of servers) await s.stop();
  }
  const report = new BenchReport('nbd', 'ours');
  for (const w of WORKLOADS) {
    for (const [server, results] of best) {
      const r = results.get(w.name)!;
      report.add(
        w.name,
        server,
        w.bs === '4k' ? r.iops : r.mibps,
        w.bs === '4k' ? 'IOPS' : 'MiB/s',
      );
    }
  }
  for (const [server, runs] of memory) {
    const peak = Math.max(...runs.map((r) => r.peak));
    report.add('RSS peak, 64 conns x QD 32 4k randrw', server, peak / MiB, 'MiB');
    report.add('RSS after 2 runs', server, runs[runs.length - 1]!.after / MiB, 'MiB');
  }
  report.note(`ours = NbdServer + FileTarget in the bench process; ${heap}`);
  report.flush();
}

try {
  await main();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
