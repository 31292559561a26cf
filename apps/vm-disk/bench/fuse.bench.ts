// The FUSE export: fio on the mounted file of `vm-disk serve` against qemu-storage-daemon's
// FUSE export of a copy of the same 256 MiB raw image on tmpfs (/dev/shm): 4 KiB random read
// and write at QD 32 and 256 KiB sequential read, direct I/O through io_uring. IOPS, and the
// daemon's CPU time per I/O (from /proc/PID/stat over the run); ratios are vm-disk's against
// qsd (above 1: vm-disk better). On a 2-CPU machine the daemon runs on CPU 0 and fio on
// CPU 1. Run with plain node after `nx build vm-disk`. VMDISK_BENCH_FUSE_SECONDS sets each
// run's length (default 5).
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
import { BenchReport } from '../../../scripts/bench/report.ts';
import {
  cpuSeconds,
  type DaemonName,
  type FioJob,
  makeImage,
  PIN,
  pinned,
  sh,
  startDaemon,
  stop,
} from './support.ts';

const SECONDS = Number(process.env.VMDISK_BENCH_FUSE_SECONDS ?? 5);
const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const dir = mkdtempSync(join(base, 'vmdisk-fuse-bench-'));
const p = (name: string): string => join(dir, name);

const mounted = (path: string) =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path);

const JOBS = [
  { name: '4k randread QD32', rw: 'randread', bs: '4k', depth: 32 },
  { name: '4k randwrite QD32', rw: 'randwrite', bs: '4k', depth: 32 },
  { name: '256k read QD8', rw: 'read', bs: '256k', depth: 8 },
];

async function run(which: DaemonName): Promise<{ iops: number; cpuUsPerIo: number }[]> {
  const image = p(`${which}.raw`);
  const mnt = p(`${which}.mnt`);
  copyFileSync(p('disk.raw'), image);
  writeFileSync(mnt, '');
  const child = startDaemon(which, [
    '--blockdev',
    `driver=file,node-name=f,filename=${image}`,
    '--export',
    `type=fuse,id=e,node-name=f,mountpoint=${mnt},writable=on`,
  ]);
  try {
    while (!mounted(mnt)) {
      if (child.exitCode !== null) throw new Error(`${which} exited (${child.exitCode})`);
      await new Promise((r) => setTimeout(r, 50));
    }
    // The daemon's pid: taskset execs the command, so it is the child's.
    const pid = child.pid as number;
    return JOBS.map((job) => {
      const before = cpuSeconds(pid);
      const fio = JSON.parse(
        sh(
          ...pinned(1, 'fio', [
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
        ),
      ).jobs[0] as FioJob;
      const side = job.rw.includes('write') ? fio.write : fio.read;
      return { iops: side.iops, cpuUsPerIo: ((cpuSeconds(pid) - before) * 1e6) / side.total_ios };
    });
  } finally {
    await stop(child);
  }
}

const report = new BenchReport('fuse');
report.note(
  `256 MiB raw image on ${base}; fio io_uring direct, ${SECONDS} s per job; ${
    PIN ? 'daemon on CPU 0, fio on CPU 1' : 'unpinned (nproc is not 2)'
  }`,
);
try {
  makeImage(p('disk.raw'), 'raw', '256M');
  const results = new Map<DaemonName, Awaited<ReturnType<typeof run>>>();
  for (const which of ['qemu-storage-daemon', 'vm-disk'] as const)
    results.set(which, await run(which));
  // The IOPS first, then the daemons' CPU time per I/O for the same runs.
  for (const [which, figures] of results)
    for (const [i, job] of JOBS.entries()) report.add(job.name, which, figures[i]!.iops, 'IOPS');
  for (const [which, figures] of results)
    for (const [i, job] of JOBS.entries())
      report.add(`${job.name}: daemon CPU`, which, figures[i]!.cpuUsPerIo, 'µs/IO', 'lower');
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
