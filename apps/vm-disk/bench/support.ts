// What the daemon benchmarks share: running a tool, pinning on a 2-CPU machine, starting
// `vm-disk serve` / qemu-storage-daemon / nbdkit on one image with the same command line,
// fio's nbd engine against it (a timed run, or a logged load beside a job), and a process's
// memory and CPU time. Not a benchmark itself (no .bench.ts).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';

/** The built bin (benchmarks run after `nx build vm-disk`). */
export const CLI = new URL('../dist/cli.js', import.meta.url).pathname;

export function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** On a 2-CPU machine the server runs on CPU 0 and its client on CPU 1. */
export const PIN = sh('nproc', []).trim() === '2';

/** `cmd args` run on `cpu` through taskset when pinning, else as it is. */
export function pinned(cpu: number, cmd: string, args: string[]): [string, string[]] {
  return PIN ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];
}

export async function waitForSocket(
  path: string,
  child: ChildProcess,
  timeoutMs = 20_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path) && Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`server exited (${child.exitCode})`);
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(path)) throw new Error(`no socket ${path} after ${timeoutMs / 1000} s`);
}

export type DaemonName = 'vm-disk' | 'qemu-storage-daemon';

/**
 * `vm-disk serve` (the built bin, warnings only) or qemu-storage-daemon; CPU 0 when pinning.
 * The bin is executed as installed, through its shebang, so that its node flags apply.
 */
export function startDaemon(name: DaemonName, args: string[]): ChildProcess {
  return name === 'vm-disk'
    ? spawn(...pinned(0, CLI, ['serve', ...args]), {
        stdio: 'ignore',
        env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' },
      })
    : spawn(...pinned(0, 'qemu-storage-daemon', args), { stdio: 'ignore' });
}

/** The command line both daemons take: a file node, a format node over it, an NBD export. */
export const daemonArgs = (image: string, format: string, sock: string): string[] => [
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  `driver=${format},node-name=d0,file=f0`,
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

export interface Server {
  name: string;
  /** Serves `image` as export `disk` on the unix socket `sock`; `extra` goes to vm-disk only. */
  start(image: string, format: string, sock: string, extra?: string[]): ChildProcess;
}

export const VM_DISK: Server = {
  name: 'vm-disk',
  start: (i, f, s, extra = []) => startDaemon('vm-disk', [...daemonArgs(i, f, s), ...extra]),
};

export const QSD: Server = {
  name: 'qemu-storage-daemon',
  start: (i, f, s) => startDaemon('qemu-storage-daemon', daemonArgs(i, f, s)),
};

/** nbdkit's file plugin: raw images only. */
export const NBDKIT: Server = {
  name: 'nbdkit file',
  start: (i, _f, s) =>
    spawn(...pinned(0, 'nbdkit', ['-f', '-U', s, '-e', 'disk', 'file', i]), { stdio: 'ignore' }),
};

export async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

/** The resident memory of a process, in bytes (VmRSS of /proc/PID/status). */
export function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

/** Clock ticks per second of /proc/PID/stat's times (USER_HZ). */
const CLK_TCK = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;

/** The CPU seconds (user + system) a process has used so far, from /proc/PID/stat. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // After the command name (in parentheses, may hold spaces): utime and stime are 12th, 13th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** The median (the mean of the middle two for an even count), and the min and max. */
export function spread(xs: number[]): { median: number; min: number; max: number } {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { median, min: s[0]!, max: s[s.length - 1]! };
}

/** One direction of a fio job: IOPS, KiB/s and the I/Os completed. */
export interface FioSide {
  iops: number;
  bw: number;
  total_ios: number;
}

export interface FioJob {
  read: FioSide;
  write: FioSide;
}

/**
 * fio's nbd engine against export `disk` on `sock`, on CPU 1 when pinning (and `pin` is
 * not false), for `runtime` seconds; resolves with fio's first (or only, with
 * --group_reporting) job.
 */
export function fio(
  sock: string,
  opts: {
    rw: string;
    bs: string;
    runtime: number;
    iodepth?: number;
    extra?: string[];
    pin?: boolean;
    /** NBD over TLS (nbds): libnbd takes its certificates from $HOME/.pki/libnbd. */
    tls?: boolean;
    /** fio's environment (HOME, for TLS). */
    env?: NodeJS.ProcessEnv;
  },
): Promise<FioJob> {
  const args = [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${opts.tls ? 'nbds' : 'nbd'}+unix:///disk?socket=${sock}`,
    `--rw=${opts.rw}`,
    `--bs=${opts.bs}`,
    `--iodepth=${opts.iodepth ?? 32}`,
    '--size=100%',
    `--runtime=${opts.runtime}`,
    '--time_based',
    '--output-format=json',
    ...(opts.extra ?? []),
  ];
  return new Promise((resolve, reject) => {
    const [cmd, argv]: [string, string[]] =
      opts.pin === false ? ['fio', args] : pinned(1, 'fio', args);
    const child = spawn(cmd, argv, { env: opts.env ?? process.env });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      err += d;
    });
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}: ${err}`));
      resolve(JSON.parse(out.slice(out.indexOf('{'))).jobs[0] as FioJob);
    });
  });
}

/** A raw or qcow2 (metadata preallocated) image of `size`, every byte written. */
export function makeImage(path: string, format: string, size: string): void {
  sh('qemu-img', [
    'create',
    '-q',
    '-f',
    format,
    ...(format === 'qcow2' ? ['-o', 'preallocation=metadata'] : []),
    path,
    size,
  ]);
  // Flushed: its writeback to the disk would otherwise run under the first measurements
  // (4 KiB random writes to pages being written back measured 5x slower, for every server).
  sh('qemu-io', ['-f', format, '-c', `write -P 0x5a 0 ${size}`, '-c', 'flush', path]);
}

/** fio running as a load beside a job; stop() ends it and gives its IOPS log. */
export interface FioLoad {
  /** SIGINT, then the log as [Unix ms, IOPS] pairs, one per 100 ms interval (none if it
   * never logged). */
  stop(): Promise<[number, number][]>;
}

/**
 * fio's 4 KiB random writes at `iodepth` on export `disk` of `sock` (on CPU 1 when pinning)
 * until stopped, over the first `size` of the disk (default all of it), logging its IOPS
 * every 100 ms with Unix timestamps to `${prefix}_iops.1.log`.
 */
export function startFioLoad(
  sock: string,
  opts: { prefix: string; iodepth: number; size?: string },
): FioLoad {
  const child = spawn(
    ...pinned(1, 'fio', [
      '--name=load',
      '--ioengine=nbd',
      `--uri=nbd+unix:///disk?socket=${sock}`,
      '--rw=randwrite',
      '--bs=4k',
      `--iodepth=${opts.iodepth}`,
      ...(opts.size !== undefined ? [`--size=${opts.size}`] : []),
      '--time_based',
      '--runtime=3600',
      `--write_iops_log=${opts.prefix}`,
      '--log_avg_msec=100',
      '--log_unix_epoch=1',
    ]),
    { stdio: 'ignore' },
  );
  return {
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGINT');
      await exited;
      const file = `${opts.prefix}_iops.1.log`;
      // None when fio never got going (starved of its CPU by other work on the machine,
      // it was still connecting when stopped): no figure rather than a failed bench.
      if (!existsSync(file)) return [];
      const log = readFileSync(file, 'utf8');
      rmSync(file, { force: true });
      return log
        .trim()
        .split('\n')
        .map((l) => l.split(',').map(Number) as [number, number]);
    },
  };
}

/**
 * The IOPS over [from, to] (Unix ms) by the log's 100 ms intervals that end in it. fio logs
 * an interval only when requests complete in it: a stall is a gap, counted as 0.
 */
function iopsOver(log: [number, number][], from: number, to: number): number {
  const ios = log.filter(([t]) => t > from && t <= to).reduce((sum, [, v]) => sum + v / 10, 0);
  return (ios * 1000) / Math.max(100, to - from);
}

/**
 * The fraction of a load's IOPS kept over [t0, t1] (Unix ms), against its IOPS before t0;
 * undefined if it had none before. fio takes a while to connect and settle: its first five
 * intervals are left out of the baseline.
 */
export function iopsKept(log: [number, number][], t0: number, t1: number): number | undefined {
  const settled = log[5]?.[0] ?? t0;
  const before = iopsOver(log, settled, t0);
  return before > 0 ? iopsOver(log, t0, t1) / before : undefined;
}
