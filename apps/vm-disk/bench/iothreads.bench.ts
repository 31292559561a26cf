// Every core (issue 18): fio with 4 jobs (nbd engine, iodepth 32 each, one connection per
// job) against a raw image on tmpfs, servers and fio unpinned. vm-disk serves it on its
// main thread, in one iothread, and in two (multi-queue: connections round-robin), against
// nbdkit's file plugin (threads) in the same run. 256 KiB sequential read and 4 KiB random
// read; best of 2 rounds, which server goes first alternating. Run with plain node after
// `nx build vm-disk`.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { CLI, fio, makeImage, stop, waitForSocket } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 3);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
const JOBS = 4;
// tmpfs: the figures are the servers', not a disk's.
const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const dir = mkdtempSync(join(base, 'vmdisk-iothreads-bench-'));

const WORKLOADS = [
  { name: '256k seqread', rw: 'read', bs: '256k' },
  { name: '4k randread', rw: 'randread', bs: '4k' },
];

interface Server {
  name: string;
  start(image: string, sock: string): ChildProcess;
}

const vmDisk = (name: string, iothreads: string[]): Server => ({
  name,
  start: (image, sock) =>
    spawn(
      process.execPath,
      [
        CLI,
        'serve',
        ...iothreads.flatMap((id) => ['--object', `iothread,id=${id}`]),
        '--blockdev',
        `driver=file,node-name=f0,filename=${image}`,
        '--blockdev',
        'driver=raw,node-name=d0,file=f0',
        '--nbd-server',
        `addr.type=unix,addr.path=${sock}`,
        '--export',
        JSON.stringify({
          type: 'nbd',
          id: 'e0',
          'node-name': 'd0',
          name: 'disk',
          writable: true,
          ...(iothreads.length === 1 && { iothread: iothreads[0] }),
          ...(iothreads.length > 1 && { iothread: iothreads }),
        }),
      ],
      { stdio: 'ignore', env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' } },
    ),
});

const SERVERS: Server[] = [
  vmDisk('vm-disk', []),
  vmDisk('vm-disk iothread', ['io0']),
  vmDisk('vm-disk 2 iothreads', ['io0', 'io1']),
  {
    name: 'nbdkit file',
    start: (image, sock) =>
      spawn('nbdkit', ['-f', '-U', sock, '-e', 'disk', 'file', image], { stdio: 'ignore' }),
  },
];

async function measure(server: Server, image: string, w: (typeof WORKLOADS)[number]) {
  const sock = join(dir, 'nbd.sock');
  rmSync(sock, { force: true });
  const child = server.start(image, sock);
  try {
    await waitForSocket(sock, child);
    const job = await fio(sock, {
      rw: w.rw,
      bs: w.bs,
      runtime: RUNTIME_S,
      pin: false,
      extra: [`--numjobs=${JOBS}`, '--group_reporting'],
    });
    return w.bs === '4k' ? job.read.iops : job.read.bw / 1024;
  } finally {
    await stop(child);
  }
}

const report = new BenchReport('iothreads', 'vm-disk 2 iothreads');
report.note(
  `${IMAGE} raw image on ${base}; fio nbd engine, ${JOBS} jobs x iodepth 32, ${RUNTIME_S} s, unpinned, best of 2 (first alternating)`,
);
try {
  const image = join(dir, 'image.raw');
  makeImage(image, 'raw', IMAGE);
  for (const w of WORKLOADS) {
    const best = new Map<string, number>();
    for (let round = 0; round < 2; round++) {
      // Which server goes first alternates by round.
      for (const s of round % 2 === 0 ? SERVERS : [...SERVERS].reverse()) {
        best.set(s.name, Math.max(best.get(s.name) ?? 0, await measure(s, image, w)));
      }
    }
    for (const [server, figure] of best) {
      report.add(`raw ${w.name}`, server, figure, w.bs === '4k' ? 'IOPS' : 'MiB/s');
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
