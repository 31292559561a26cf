// Disks with no file under them: `vm-disk serve` against qemu-storage-daemon given the same
// command line, for a `null-co` node (what an NBD layer is benchmarked on) and for an `nbd`
// node re-exporting another server's disk (a vm-disk serving a null-co node, pinned to CPU 1
// with fio, the same backend for both), driven by fio's nbd engine over a unix socket: 1 MiB
// sequential write and read at iodepth 8, 4 KiB random read at iodepth 32. Figures: MiB/s
// or IOPS and the server's CPU per I/O (user + system, /proc) of the same run. Servers take
// turns, which goes first alternating by round; each figure is the median of the rounds.
// null-co runs with read-zeroes=off in both (QEMU 7.2's default: a read leaves the buffer
// alone), so that neither server measures a memset.
// On a 2-CPU machine each server runs on CPU 0 and fio on CPU 1. Needs `nx build vm-disk`.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import {
  alternatedRounds,
  fioOnDaemon,
  type MedianRow,
  reportMedians,
  type Workload,
} from './rounds.ts';
import { CLI, type DaemonName, PIN, pinned, stop, waitForSocket } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-no-file-bench-'));
const NULL_CO = 'driver=null-co,size=1073741824,read-zeroes=off';

const WORKLOADS: Workload[] = [
  { name: '1M seqwrite', rw: 'write', bs: '1M', depth: 8 },
  { name: '1M seqread', rw: 'read', bs: '1M', depth: 8 },
  { name: '4k randread', rw: 'randread', bs: '4k', depth: 32 },
];

const backendSock = join(dir, 'backend.sock');
const SETUPS = [
  { name: 'null-co', node: `${NULL_CO},node-name=d0` },
  {
    name: 'nbd re-export',
    node: `driver=nbd,node-name=d0,server.type=unix,server.path=${backendSock},export=back`,
  },
];

const serverArgs = (node: string, sock: string, name = 'disk') => [
  '--blockdev',
  node,
  '--nbd-server',
  `addr.type=unix,addr.path=${sock}`,
  '--export',
  `type=nbd,id=e0,node-name=d0,name=${name},writable=on`,
];

const SERVERS: DaemonName[] = ['vm-disk', 'qemu-storage-daemon'];

function measure(server: DaemonName, node: string, w: Workload) {
  const sock = join(dir, `${server.replace(/\W/g, '')}.sock`);
  rmSync(sock, { force: true });
  return fioOnDaemon(server, serverArgs(node, sock), sock, w, { runtime: RUNTIME_S });
}

const report = new BenchReport('no-file');
report.note(
  `fio nbd engine, ${RUNTIME_S} s, median of ${ROUNDS} rounds (servers alternating first); null-co with read-zeroes=off; the re-exported disk is a vm-disk null-co server on CPU 1; ${
    PIN ? 'servers on CPU 0, fio on CPU 1' : 'unpinned (nproc is not 2)'
  }`,
);
const backend = spawn(
  ...pinned(1, CLI, ['serve', ...serverArgs(`${NULL_CO},node-name=d0`, backendSock, 'back')]),
  { stdio: 'ignore', env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' } },
);
try {
  await waitForSocket(backendSock, backend);
  const rows: MedianRow[] = [];
  for (const setup of SETUPS) {
    rows.push(
      ...(await alternatedRounds(
        SERVERS,
        WORKLOADS,
        ROUNDS,
        (s, w) => measure(s, setup.node, w),
        (w) => `${setup.name}: ${w.name}`,
      )),
    );
  }
  reportMedians(report, rows);
} finally {
  await stop(backend);
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
