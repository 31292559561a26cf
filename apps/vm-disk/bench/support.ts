// What the daemon benchmarks share: running a tool, pinning on a 2-CPU machine, starting
// `vm-disk serve` / qemu-storage-daemon / nbdkit on one image with the same command line,
// and fio's nbd engine against it. Not a benchmark itself (no .bench.ts).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';

/** The built bin (benchmarks run after `nx build vm-disk`). */
export const CLI = new URL('../dist/cli.js', import.meta.url).pathname;

export function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** On a 2-CPU machine the server runs on CPU 0 and its client on CPU 1. */
export const PIN = sh('nproc', []).trim() === '2';

/** `cmd args` run on `cpu` through taskset when pinning, else as it is. */
export function pinned(cpu: number, cmd: string, args: string[]): [string, string[]] {
  return PIN ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];
}

export async function waitForSocket(path: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) {
    if (child.exitCode !== null) throw new Error(`server exited (${child.exitCode})`);
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(path)) throw new Error(`no socket ${path} after 20 s`);
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
  start: (i, f, s, extra = []) =>
    spawn(...pinned(0, process.execPath, [CLI, 'serve', ...daemonArgs(i, f, s), ...extra]), {
      stdio: 'ignore',
      env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' },
    }),
};

export const QSD: Server = {
  name: 'qemu-storage-daemon',
  start: (i, f, s) =>
    spawn(...pinned(0, 'qemu-storage-daemon', daemonArgs(i, f, s)), { stdio: 'ignore' }),
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

export interface FioJob {
  read: { iops: number; bw: number };
  write: { iops: number; bw: number };
}

/**
 * fio's nbd engine against export `disk` on `sock`, on CPU 1 when pinning, for `runtime`
 * seconds; resolves with fio's first (or only, with --group_reporting) job.
 */
export function fio(
  sock: string,
  opts: { rw: string; bs: string; runtime: number; iodepth?: number; extra?: string[] },
): Promise<FioJob> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      ...pinned(1, 'fio', [
        '--name=bench',
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${sock}`,
        `--rw=${opts.rw}`,
        `--bs=${opts.bs}`,
        `--iodepth=${opts.iodepth ?? 32}`,
        '--size=100%',
        `--runtime=${opts.runtime}`,
        '--time_based',
        '--output-format=json',
        ...(opts.extra ?? []),
      ]),
    );
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
  sh('qemu-io', ['-f', format, '-c', `write -P 0x5a 0 ${size}`, path]);
}
