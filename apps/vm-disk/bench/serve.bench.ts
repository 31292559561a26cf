// The comparison users make: `vm-disk serve` against qemu-storage-daemon given the same
// command line (and nbdkit's file plugin for raw), serving the same image over a unix
// socket to fio's nbd engine at iodepth 32. Raw and qcow2 images; 4 KiB random read,
// 4 KiB random write, 256 KiB sequential read. Servers take turns, best of 2 rounds.
// On a 2-CPU machine each server runs pinned to CPU 0 (`taskset -c 0`) and fio to CPU 1
// (`taskset -c 1`), so that server and client do not share a core; otherwise unpinned.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const CLI = new URL('../dist/cli.js', import.meta.url).pathname;
const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 3);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-serve-bench-'));

const WORKLOADS = [
  { name: '4k randread', rw: 'randread', bs: '4k' },
  { name: '4k randwrite', rw: 'randwrite', bs: '4k' },
  { name: '256k seqread', rw: 'read', bs: '256k' },
];

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const CPUS = sh('nproc', []).trim();
const PIN = CPUS === '2';
console.log(
  PIN
    ? 'pinning: each server on CPU 0 (taskset -c 0), fio on CPU 1 (taskset -c 1)'
    : `pinning skipped: nproc is ${CPUS}, not 2 (servers and fio unpinned)`,
);

/** `cmd args` run on `cpu` through taskset when pinning, else as it is. */
function pinned(cpu: number, cmd: string, args: string[]): [string, string[]] {
  return PIN ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];
}

async function waitForSocket(path: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 200 && !existsSync(path); i++) {
    if (child.exitCode !== null) throw new Error('server exited');
    await new Promise((r) => setTimeout(r, 50));
  }
}

function fio(sock: string, w: (typeof WORKLOADS)[number]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      ...pinned(1, 'fio', [
        '--name=bench',
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${sock}`,
        `--rw=${w.rw}`,
        `--bs=${w.bs}`,
        '--iodepth=32',
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
      resolve(w.bs === '4k' ? side.iops : side.bw / 1024);
    });
  });
}

interface Server {
  name: string;
  start(image: string, format: string, sock: string): ChildProcess;
}

const qsdArgs = (image: string, format: string, sock: string) => [
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  `driver=${format},node-name=d0,file=f0`,
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

const SERVERS: Server[] = [
  {
    name: 'vm-disk',
    start: (i, f, s) =>
      spawn(...pinned(0, process.execPath, [CLI, 'serve', ...qsdArgs(i, f, s)]), {
        stdio: 'ignore',
        env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' },
      }),
  },
  {
    name: 'qemu-storage-daemon',
    start: (i, f, s) =>
      spawn(...pinned(0, 'qemu-storage-daemon', qsdArgs(i, f, s)), { stdio: 'ignore' }),
  },
  {
    name: 'nbdkit file',
    start: (i, _f, s) =>
      spawn(...pinned(0, 'nbdkit', ['-f', '-U', s, '-e', 'disk', 'file', i]), {
        stdio: 'ignore',
      }),
  },
];

async function measure(
  server: Server,
  image: string,
  format: string,
  w: (typeof WORKLOADS)[number],
): Promise<number> {
  const sock = join(dir, `${server.name.replace(/\W/g, '')}.sock`);
  rmSync(sock, { force: true });
  const child = server.start(image, format, sock);
  try {
    await waitForSocket(sock, child);
    return await fio(sock, w);
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
}

const rows: string[][] = [];
try {
  for (const format of ['raw', 'qcow2']) {
    const image = join(dir, `image.${format}`);
    sh('qemu-img', [
      'create',
      '-q',
      '-f',
      format,
      ...(format === 'qcow2' ? ['-o', 'preallocation=metadata'] : []),
      image,
      IMAGE,
    ]);
    sh('qemu-io', ['-f', format, '-c', `write -P 0x5a 0 ${IMAGE}`, image]);
    const servers = format === 'raw' ? SERVERS : SERVERS.slice(0, 2);
    for (const w of WORKLOADS) {
      const best = new Map<string, number>();
      for (let round = 0; round < 2; round++) {
        for (const s of servers)
          best.set(s.name, Math.max(best.get(s.name) ?? 0, await measure(s, image, format, w)));
      }
      const ours = best.get('vm-disk') as number;
      const unit = w.bs === '4k' ? 'IOPS' : 'MiB/s';
      const figure = (name: string) => best.get(name);
      const cells = SERVERS.map((s) =>
        figure(s.name) === undefined ? '-' : String(Math.round(figure(s.name) as number)),
      );
      const ratios = servers
        .slice(1)
        .map((s) => `${(ours / (figure(s.name) as number)).toFixed(2)}x ${s.name}`);
      rows.push([format, w.name, unit, ...cells, ratios.join(', ')]);
      console.log(
        `${format} ${w.name} (${unit}): ${cells.join(' / ')}  ->  vm-disk ${ratios.join(', ')}`,
      );
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(
  `\n| image | workload | unit | ${SERVERS.map((s) => s.name).join(' | ')} | vm-disk ratio |\n|${'---|'.repeat(SERVERS.length + 4)}`,
);
for (const r of rows) console.log(`| ${r.join(' | ')} |`);
