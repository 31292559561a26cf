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
import { alternatedRounds, fioOnDaemon, reportMedians, type Workload } from './rounds.ts';
import { type DaemonName, makeImage, PIN } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const base = '/dev/shm';
const dir = mkdtempSync(join(base, 'vmdisk-tls-bench-'));
const home = mkdtempSync(join(tmpdir(), 'vmdisk-tls-bench-home-'));

const WORKLOADS: Workload[] = [
  { name: '4k randread', rw: 'randread', bs: '4k', depth: 32 },
  { name: '1M seqread', rw: 'read', bs: '1M', depth: 8 },
  { name: '1M seqwrite', rw: 'write', bs: '1M', depth: 8 },
];
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
  const measure = (server: DaemonName, w: Workload) => {
    const sock = join(dir, `${server.replace(/\W/g, '')}.sock`);
    rmSync(sock, { force: true });
    return fioOnDaemon(server, serverArgs(certs.server, image, sock), sock, w, {
      runtime: RUNTIME_S,
      tls: true,
      env: { ...process.env, HOME: home },
    });
  };
  reportMedians(report, await alternatedRounds(SERVERS, WORKLOADS, ROUNDS, measure));
} finally {
  rmSync(dir, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
report.flush();
