// Resident memory: `vm-disk serve` against qemu-storage-daemon (and nbdkit's file plugin)
// serving one raw image as one NBD export with the same command line: idle (after start-up,
// no client), then the peak under 64 connections x 32 requests in flight of 256 KiB reads
// (fio's nbd engine, 64 jobs, one connection each), then after that load. Target (issue 18):
// idle <= 50 MB; under load <= 2x qemu-storage-daemon's plus our idle baseline.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import {
  type FioJob,
  fio,
  makeImage,
  NBDKIT,
  QSD,
  rss,
  type Server,
  stop,
  VM_DISK,
  waitForSocket,
} from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
/** How long a server is left alone after its socket appears before its idle RSS is read. */
const SETTLE_MS = 2000;
/** When the RSS is read again after the load (the engine gives its cache back after 5 s idle). */
const AFTER_MS = 8000;
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-memory-bench-'));
const MB = 1e6;

async function measure(server: Server, image: string) {
  const sock = join(dir, `${server.name.replace(/\W/g, '')}.sock`);
  rmSync(sock, { force: true });
  const child = server.start(image, 'raw', sock);
  try {
    await waitForSocket(sock, child);
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    // taskset execs the server: the pid is the server's.
    const pid = child.pid!;
    const idle = rss(pid);
    let peak = idle;
    const timer = setInterval(() => {
      peak = Math.max(peak, rss(pid));
    }, 100);
    let job: FioJob;
    try {
      job = await fio(sock, {
        rw: 'randread',
        bs: '256k',
        runtime: RUNTIME_S,
        extra: ['--numjobs=64', '--thread', '--group_reporting'],
      });
    } finally {
      clearInterval(timer);
    }
    await new Promise((r) => setTimeout(r, AFTER_MS));
    return { idle, peak, after: rss(pid), mibs: job.read.bw / 1024 };
  } finally {
    await stop(child);
  }
}

const report = new BenchReport('memory');
report.note(
  `${IMAGE} raw image in ${tmpdir()}, one NBD export on a unix socket; idle read ${SETTLE_MS} ms after start-up; ` +
    `load: fio nbd, 64 jobs x iodepth 32, 256 KiB random reads, ${RUNTIME_S} s, RSS sampled every 100 ms. MB = 10^6 bytes.`,
);
try {
  const image = join(dir, 'image.raw');
  makeImage(image, 'raw', IMAGE);
  for (const s of [VM_DISK, QSD, NBDKIT]) {
    const m = await measure(s, image);
    report.add('RSS idle', s.name, m.idle / MB, 'MB');
    report.add('RSS peak, 64 conns x QD 32 x 256k read', s.name, m.peak / MB, 'MB');
    report.add(`RSS ${AFTER_MS / 1000} s after the load`, s.name, m.after / MB, 'MB');
    report.add('read throughput under that load', s.name, m.mibs, 'MiB/s');
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
