// What metrics cost: `vm-disk serve` serving the same image to fio's nbd engine (4 KiB
// random reads, iodepth 32, a unix socket) without --metrics and with it, scraped once a
// second meanwhile (as Prometheus would). Raw and qcow2 images; the two take turns, best
// of VMDISK_BENCH_ROUNDS (2) rounds; the ratio on/off is the figure (target: >= 0.95).
// On a 2-CPU machine the server runs on CPU 0 and fio on CPU 1, as in serve.bench.ts.
// The nodes' accounting itself is always on (query-blockstats reads it): both runs pay for
// it; this measures the endpoint and its scrapes.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { fio, makeImage, stop, VM_DISK, waitForSocket } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-metrics-bench-'));

/** GETs /metrics on the unix socket; resolves with the body's length. */
function scrape(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: '/metrics' }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => {
        n += d.length;
      });
      res.on('end', () => resolve(n));
    });
    req.on('error', reject);
    req.end();
  });
}

async function measure(image: string, format: string, metrics: boolean): Promise<number> {
  const sock = join(dir, 'nbd.sock');
  const metricsSock = join(dir, 'metrics.sock');
  rmSync(sock, { force: true });
  const extra = metrics ? ['--metrics', `addr.type=unix,addr.path=${metricsSock}`] : [];
  const child = VM_DISK.start(image, format, sock, extra);
  let scrapes = 0;
  const scraper = metrics
    ? setInterval(() => {
        scrape(metricsSock).then(
          () => scrapes++,
          () => {},
        );
      }, 1000)
    : undefined;
  try {
    await waitForSocket(sock, child);
    const job = await fio(sock, { rw: 'randread', bs: '4k', runtime: RUNTIME_S });
    if (metrics && scrapes === 0) throw new Error('the metrics endpoint was never scraped');
    return job.read.iops;
  } finally {
    clearInterval(scraper);
    await stop(child);
  }
}

// "ours" is the run with metrics on; its ratio over the run without is the cost.
const report = new BenchReport('metrics', 'metrics on');
report.note(`fio nbd 4k randread, iodepth 32, ${RUNTIME_S} s, best of ${ROUNDS}; target >= 0.95`);
try {
  for (const format of ['raw', 'qcow2']) {
    const image = join(dir, `image.${format}`);
    makeImage(image, format, IMAGE);
    let off = 0;
    let on = 0;
    // Turns alternate which goes first, so that neither always meets a cold page cache.
    for (let round = 0; round < ROUNDS; round++) {
      for (const metrics of round % 2 === 0 ? [false, true] : [true, false]) {
        const iops = await measure(image, format, metrics);
        if (metrics) on = Math.max(on, iops);
        else off = Math.max(off, iops);
      }
    }
    report.add(`${format} 4k randread`, 'metrics off', off, 'IOPS');
    report.add(`${format} 4k randread`, 'metrics on', on, 'IOPS');
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
