// The FUSE export: fio on the mounted file of `vm-disk serve` against qemu-storage-daemon's
// FUSE export of a copy of the same 256 MiB raw image on tmpfs (/dev/shm), each daemon
// pinned to one core (taskset, where there is one): 4 KiB random read and write at QD 32
// and 256 KiB sequential read, direct I/O through io_uring. IOPS, and the daemon's CPU time
// per I/O (from /proc/PID/stat over the run); ratios ours over theirs. Run with plain node
// after `nx build vm-disk`. VMDISK_BENCH_FUSE_SECONDS sets each run's length (default 5).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const CLI = new URL('../dist/cli.js', import.meta.url).pathname;
const SECONDS = Number(process.env.VMDISK_BENCH_FUSE_SECONDS ?? 5);
const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const dir = mkdtempSync(join(base, 'vmdisk-fuse-bench-'));
const p = (name: string): string => join(dir, name);
const TICK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100);
const pin = spawnSync('taskset', ['-c', '0', 'true']).status === 0 ? ['taskset', '-c', '0'] : [];

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const mounted = (path: string) =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path);

/** User + system CPU seconds of a process so far. */
function cpu(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / TICK;
}

const JOBS = [
  { name: '4k randread QD32', rw: 'randread', bs: '4k', depth: 32 },
  { name: '4k randwrite QD32', rw: 'randwrite', bs: '4k', depth: 32 },
  { name: '256k read QD8', rw: 'read', bs: '256k', depth: 8 },
];

async function run(which: 'qsd' | 'vm-disk'): Promise<{ iops: number; cpuPerIo: number }[]> {
  const image = p(`${which}.raw`);
  const mnt = p(`${which}.mnt`);
  copyFileSync(p('disk.raw'), image);
  writeFileSync(mnt, '');
  const args = [
    '--blockdev',
    `driver=file,node-name=f,filename=${image}`,
    '--export',
    `type=fuse,id=e,node-name=f,mountpoint=${mnt},writable=on`,
  ];
  const cmd =
    which === 'qsd' ? ['qemu-storage-daemon', ...args] : [process.execPath, CLI, 'serve', ...args];
  const [exe, ...rest] = [...pin, ...cmd];
  const child: ChildProcess = spawn(exe!, rest, { stdio: 'ignore' });
  const exited = new Promise((r) => child.on('exit', r));
  while (!mounted(mnt)) await new Promise((r) => setTimeout(r, 50));
  // The daemon's pid: taskset execs the command, so it is the child's.
  const pid = child.pid!;
  const out = JOBS.map((job) => {
    const before = cpu(pid);
    const fio = JSON.parse(
      sh('fio', [
        '--name=t',
        `--filename=${mnt}`,
        `--rw=${job.rw}`,
        `--bs=${job.bs}`,
        `--iodepth=${job.depth}`,
        '--ioengine=io_uring',
        '--direct=1',
        `--runtime=${SECONDS}`,
        '--time_based',
        '--output-format=json',
      ]),
    ).jobs[0];
    const side = job.rw.includes('write') ? fio.write : fio.read;
    const ios = side.total_ios as number;
    return { iops: side.iops as number, cpuPerIo: (cpu(pid) - before) / ios };
  });
  child.kill('SIGTERM');
  await exited;
  return out;
}

try {
  sh('qemu-img', ['create', '-q', '-f', 'raw', p('disk.raw'), '256M']);
  sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 256M', p('disk.raw')]);
  const theirs = await run('qsd');
  const ours = await run('vm-disk');
  console.log(
    'job                 vm-disk IOPS   qsd IOPS  ratio   µs CPU/IO vm-disk     qsd  ratio',
  );
  JOBS.forEach((job, i) => {
    const o = ours[i]!;
    const t = theirs[i]!;
    console.log(
      `${job.name.padEnd(20)}${o.iops.toFixed(0).padStart(12)}${t.iops.toFixed(0).padStart(11)}` +
        `${(o.iops / t.iops).toFixed(2).padStart(7)}` +
        `${(o.cpuPerIo * 1e6).toFixed(1).padStart(18)}${(t.cpuPerIo * 1e6).toFixed(1).padStart(8)}` +
        `${(o.cpuPerIo / t.cpuPerIo).toFixed(2).padStart(7)}`,
    );
  });
} finally {
  rmSync(dir, { recursive: true, force: true });
}
