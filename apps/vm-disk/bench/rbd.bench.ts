// An RBD image served over NBD: `vm-disk serve` against qemu-storage-daemon 7.2 given the
// same command line (an rbd node of a single-node Ceph cluster that this benchmark starts
// in a container, harness/ceph.ts, exported on a unix socket), driven by fio's nbd engine:
// 4 KiB random read and write at iodepth 32, 1 MiB sequential read and write at iodepth 8.
// Figures: IOPS (4 KiB) or MiB/s (1 MiB), and the CPU time the server spent per I/O
// (user + system, from /proc), each with vm-disk's ratio to qsd. Servers take turns, best
// of 2 rounds. On a 2-CPU machine each server runs on CPU 0 and fio on CPU 1; the OSD
// shares them (it is what both servers wait on). Needs the Ceph image
// (scripts/setup-test-env.sh) and `nx build vm-disk`.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CephCluster } from '../test/harness/ceph.ts';

const CLI = new URL('../dist/cli.js', import.meta.url).pathname;
const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 3);
const IMAGE_MB = 128;
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-rbd-bench-'));

const WORKLOADS = [
  { name: '4k randread', rw: 'randread', bs: '4k', depth: 32 },
  { name: '4k randwrite', rw: 'randwrite', bs: '4k', depth: 32 },
  { name: '1M seqread', rw: 'read', bs: '1M', depth: 8 },
  { name: '1M seqwrite', rw: 'write', bs: '1M', depth: 8 },
];
type Workload = (typeof WORKLOADS)[number];

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const PIN = sh('nproc', []).trim() === '2';
const pinned = (cpu: number, cmd: string, args: string[]): [string, string[]] =>
  PIN ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];

/** CPU seconds (user + system) a process has used, from /proc/PID/stat. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]); // utime, stime
  return ticks / 100; // USER_HZ
}

async function waitForSocket(path: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 600 && !existsSync(path); i++) {
    if (child.exitCode !== null) throw new Error('server exited');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** fio's figure (IOPS or MiB/s) and the number of I/Os it completed. */
function fio(sock: string, w: Workload): Promise<{ figure: number; ios: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      ...pinned(1, 'fio', [
        '--name=bench',
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${sock}`,
        `--rw=${w.rw}`,
        `--bs=${w.bs}`,
        `--iodepth=${w.depth}`,
        '--size=100%',
        `--runtime=${RUNTIME_S}`,
        '--time_based',
        '--output-format=json',
      ]),
    );
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}`));
      const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
      const side = w.rw.includes('write') ? job.write : job.read;
      resolve({ figure: w.bs === '4k' ? side.iops : side.bw / 1024, ios: side.total_ios });
    });
  });
}

const serverArgs = (conf: string, sock: string) => [
  '--blockdev',
  `driver=rbd,node-name=d0,pool=rbd,image=bench,conf=${conf}`,
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

const SERVERS = [
  {
    name: 'vm-disk',
    start: (conf: string, sock: string) =>
      spawn(...pinned(0, process.execPath, [CLI, 'serve', ...serverArgs(conf, sock)]), {
        stdio: 'ignore',
        env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' },
      }),
  },
  {
    name: 'qemu-storage-daemon',
    start: (conf: string, sock: string) =>
      spawn(...pinned(0, 'qemu-storage-daemon', serverArgs(conf, sock)), { stdio: 'ignore' }),
  },
];

interface Result {
  figure: number;
  /** Server CPU microseconds per I/O. */
  cpuPerIo: number;
}

async function measure(
  server: (typeof SERVERS)[number],
  conf: string,
  w: Workload,
): Promise<Result> {
  const sock = join(dir, `${server.name.replace(/\W/g, '')}.sock`);
  rmSync(sock, { force: true });
  const child = server.start(conf, sock);
  try {
    await waitForSocket(sock, child);
    const before = cpuSeconds(child.pid as number);
    const { figure, ios } = await fio(sock, w);
    const used = cpuSeconds(child.pid as number) - before;
    return { figure, cpuPerIo: (used * 1e6) / Math.max(1, ios) };
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
}

const rows: string[][] = [];
const ceph = await CephCluster.start();
try {
  await ceph.rbd(`create --size ${IMAGE_MB}M rbd/bench`);
  // Data everywhere, so that reads read objects rather than holes.
  sh('qemu-io', [
    '-f',
    'raw',
    '-c',
    `write -P 0x5a 0 ${IMAGE_MB}M`,
    `rbd:rbd/bench:conf=${ceph.conf}`,
  ]);
  for (const w of WORKLOADS) {
    const best = new Map<string, Result>();
    for (let round = 0; round < 2; round++) {
      for (const s of SERVERS) {
        const r = await measure(s, ceph.conf, w);
        const prev = best.get(s.name);
        if (!prev || r.figure > prev.figure) best.set(s.name, r);
      }
    }
    const ours = best.get('vm-disk') as Result;
    const theirs = best.get('qemu-storage-daemon') as Result;
    const unit = w.bs === '4k' ? 'IOPS' : 'MiB/s';
    const row = [
      w.name,
      unit,
      String(Math.round(ours.figure)),
      String(Math.round(theirs.figure)),
      `${(ours.figure / theirs.figure).toFixed(2)}x`,
      ours.cpuPerIo.toFixed(1),
      theirs.cpuPerIo.toFixed(1),
      `${(ours.cpuPerIo / theirs.cpuPerIo).toFixed(2)}x`,
    ];
    rows.push(row);
    console.log(row.join('  '));
  }
} finally {
  await ceph.stop();
  rmSync(dir, { recursive: true, force: true });
}
console.log(
  '\n| workload | unit | vm-disk | qemu-storage-daemon | ratio | vm-disk CPU µs/IO | qsd CPU µs/IO | CPU ratio |\n|---|---|---|---|---|---|---|---|',
);
for (const r of rows) console.log(`| ${r.join(' | ')} |`);
