// NBD over TLS: `vm-disk serve` against qemu-storage-daemon given the same command line (a
// raw image in tmpfs, an x509 tls-creds object, the export on a unix socket), driven by
// fio's nbd engine over `nbds+unix` (libnbd takes the client's certificates from
// $HOME/.pki/libnbd: fio runs with HOME at a temp dir holding them): 4 KiB random read at
// iodepth 32, 1 MiB sequential read and write at iodepth 8. Figures: IOPS or MiB/s and the
// server's CPU per I/O (user + system, /proc). Servers take turns, which goes first
// alternating by round; each figure is the median of the rounds. On a 2-CPU machine each
// server runs on CPU 0 and fio on CPU 1. Needs `nx build vm-disk` and openssl.
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { makeCertificates } from '../../../tools/test-support/src/index.ts';
import {
  cpuSeconds,
  type DaemonName,
  fio,
  makeImage,
  PIN,
  spread,
  startDaemon,
  stop,
  waitForSocket,
} from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const base = '/dev/shm';
const dir = mkdtempSync(join(base, 'vmdisk-tls-bench-'));
const home = mkdtempSync(join(tmpdir(), 'vmdisk-tls-bench-home-'));

const WORKLOADS = [
  { name: '4k randread', rw: 'randread', bs: '4k', depth: 32 },
  { name: '1M seqread', rw: 'read', bs: '1M', depth: 8 },
  { name: '1M seqwrite', rw: 'write', bs: '1M', depth: 8 },
];
type Workload = (typeof WORKLOADS)[number];
const SERVERS: DaemonName[] = ['vm-disk', 'qemu-storage-daemon'];

const serverArgs = (certs: string, image: string, sock: string) => [
  '--object',
  `tls-creds-x509,id=tls0,dir=${certs},endpoint=server,verify-peer=off`,
  '--blockdev',
  `driver=file,node-name=f0,filename=${image}`,
  '--blockdev',
  'driver=raw,node-name=d0,file=f0',
  '--nbd-server',
  `addr.type=unix,addr.path=${sock},tls-creds=tls0`,
  '--export',
  'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
];

interface Result {
  figure: number;
  cpuPerIo: number;
}

async function measure(server: DaemonName, args: string[], sock: string, w: Workload) {
  rmSync(sock, { force: true });
  const child = startDaemon(server, args);
  try {
    await waitForSocket(sock, child);
    const before = cpuSeconds(child.pid as number);
    const job = await fio(sock, {
      rw: w.rw,
      bs: w.bs,
      iodepth: w.depth,
      runtime: RUNTIME_S,
      tls: true,
      env: { ...process.env, HOME: home },
    });
    const used = cpuSeconds(child.pid as number) - before;
    const side = w.rw.includes('write') ? job.write : job.read;
    return {
      figure: w.bs === '4k' ? side.iops : side.bw / 1024,
      cpuPerIo: (used * 1e6) / Math.max(1, side.total_ios),
    } satisfies Result;
  } finally {
    await stop(child);
  }
}

const report = new BenchReport('tls');
report.note(
  `512 MiB raw image in ${base}; NBD over TLS (x509, unix socket); fio nbd engine, ${RUNTIME_S} s, median of ${ROUNDS} rounds (servers alternating first); ${
    PIN ? 'servers on CPU 0, fio on CPU 1' : 'unpinned (nproc is not 2)'
  }`,
);
try {
  const certs = await makeCertificates(dir, 'certs');
  const libnbd = join(home, '.pki', 'libnbd');
  mkdirSync(libnbd, { recursive: true });
  for (const f of readdirSync(certs.client)) copyFileSync(join(certs.client, f), join(libnbd, f));
  const image = join(dir, 'disk.raw');
  makeImage(image, 'raw', '512M');
  const cpuRows: [string, string, number][] = [];
  for (const w of WORKLOADS) {
    const runs = new Map<DaemonName, Result[]>(SERVERS.map((s) => [s, []]));
    for (let round = 0; round < ROUNDS; round++) {
      const order = round % 2 === 0 ? SERVERS : [...SERVERS].reverse();
      for (const s of order) {
        const sock = join(dir, `${s.replace(/\W/g, '')}.sock`);
        runs.get(s)!.push(await measure(s, serverArgs(certs.server, image, sock), sock, w));
      }
    }
    const unit = w.bs === '4k' ? 'IOPS' : 'MiB/s';
    for (const [server, rs] of runs) {
      const fig = spread(rs.map((r) => r.figure));
      const cpu = spread(rs.map((r) => r.cpuPerIo));
      console.log(
        `  ${w.name} ${server}: ${fig.median.toFixed(0)} ${unit} (${fig.min.toFixed(0)}-${fig.max.toFixed(0)}), CPU ${cpu.median.toFixed(0)} µs/IO`,
      );
      report.add(w.name, server, fig.median, unit);
      cpuRows.push([`${w.name}: server CPU`, server, cpu.median]);
    }
  }
  for (const [workload, server, us] of cpuRows) report.add(workload, server, us, 'µs/IO', 'lower');
} finally {
  rmSync(dir, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
report.flush();
