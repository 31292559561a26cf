// Benchmark of the qcow2 driver through the graph (BlockBackend > qcow2 > file) against
// `qemu-img bench` on the same image, in the same run: 4 KiB reads and writes at queue
// depth 32 over allocated clusters, and 1 MiB sequential writes allocating a fresh image.
// qemu-img bench walks the image with a fixed step (offset += step, modulo the size); we
// use the same offsets, a step of 7919 blocks so that they scatter over the image. Both
// use the page cache (qemu: -t writeback) and the same I/O backend (qemu: -i io_uring when
// our engine uses io_uring, else threads), and one data buffer for all requests as
// qemu-img bench does (see ours()). Target: ours >= 0.8x qemu-img bench.
// Each workload runs BENCH_ROUNDS times (default 5), alternating; medians are shown.
// Run: node bench/qcow2.bench.ts (BENCH_COUNT=requests for the 4 KiB runs; BENCH_ONLY=text:
// only the workloads whose name contains it, e.g. BENCH_ONLY=sequential).

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sharedEngine } from '@vmdisk/engine';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { qcow2Driver } from '../src/drivers/qcow2/qcow2.ts';
import { BlockGraph } from '../src/index.ts';

const SIZE = 64 * 1024 * 1024;
const QD = 32;
const COUNT = Number(process.env.BENCH_COUNT ?? 100_000);
const SEQ_COUNT = 256;
const SEQ_SIZE = 256 * 1024 * 1024;
const TARGET = 0.8;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const ONLY = process.env.BENCH_ONLY;

const dir = mkdtempSync(join(tmpdir(), 'qcow2-bench-'));
const engine = await sharedEngine('auto');
const aio = engine.backend === 'io_uring' ? 'io_uring' : 'threads';

function qemuBench(path: string, count: number, bs: number, step: number, write: boolean): number {
  const args = [
    'bench',
    '-f',
    'qcow2',
    '-d',
    String(QD),
    '-c',
    String(count),
    '-s',
    String(bs),
    '-S',
    String(step),
    '-t',
    'writeback',
    '-i',
    aio,
  ];
  if (write) args.push('-w');
  const out = execFileSync('qemu-img', [...args, path], { encoding: 'utf8' });
  const secs = Number(/completed in ([\d.]+) seconds/.exec(out)?.[1]);
  return count / secs;
}

async function ours(
  path: string,
  count: number,
  bs: number,
  step: number,
  write: boolean,
  size = SIZE,
): Promise<number> {
  const g = new BlockGraph({ drivers: [qcow2Driver] });
  await g.add({
    driver: 'qcow2',
    'node-name': 'disk',
    file: { driver: 'file', filename: path, aio: engine.backend },
  });
  const b = await g.createBackend('disk', { write });
  // One buffer for every request, as qemu-img bench has: it sets up one I/O vector per
  // request slot but passes the first to each request (bench_cb hands b->qiov, the
  // array, to blk_aio_pwritev/preadv). With 32 distinct 1 MiB buffers the kernel's copies
  // into the page cache read 32 MiB that the caches do not hold, and cost twice as much
  // as from qemu-img's one buffer (perf, io-wq copy time for 256 MiB: ~30 vs ~15 ms).
  const buf = engine.allocBuffer(bs);
  buf.fill(0x5a);
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: QD }, async () => {
      for (;;) {
        const i = next++;
        if (i >= count) return;
        const off = (i * step) % size;
        if (write) await b.write(off, buf);
        else await b.read(off, buf);
      }
    }),
  );
  // Like qemu-img bench's figure, the time stops before the final flush.
  const secs = (performance.now() - t0) / 1000;
  if (write) await b.flush();
  engine.releaseBuffer(buf);
  await b.close();
  await g.close();
  return count / secs;
}

function image(name: string, fill: boolean, size = SIZE): string {
  const p = join(dir, name);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(size)]);
  if (fill)
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 1 0 ${SIZE}`, p], { stdio: 'ignore' });
  return p;
}

try {
  const rows: Array<[string, number, number, number]> = [];
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  // Each workload ROUNDS times, ours and qemu alternating; the medians are reported (the
  // machine is shared: single runs swing by 2x).
  const measure = async (
    name: string,
    bs: number,
    runOurs: (round: number) => Promise<number>,
    runQemu: (round: number) => number,
  ) => {
    if (ONLY && !name.includes(ONLY)) return;
    const o: number[] = [];
    const q: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      if (round % 2 === 0) {
        o.push(await runOurs(round));
        q.push(runQemu(round));
      } else {
        q.push(runQemu(round));
        o.push(await runOurs(round));
      }
    }
    rows.push([name, median(o), median(q), bs]);
  };
  const filled = image('filled.qcow2', true);
  const step4k = 4096 * 7919;
  // Warm-up (JIT, caches).
  await ours(filled, 5000, 4096, step4k, false);
  await measure(
    '4 KiB read, QD 32',
    4096,
    () => ours(filled, COUNT, 4096, step4k, false),
    () => qemuBench(filled, COUNT, 4096, step4k, false),
  );
  await measure(
    '4 KiB write (allocated), QD 32',
    4096,
    () => ours(filled, COUNT, 4096, step4k, true),
    () => qemuBench(filled, COUNT, 4096, step4k, true),
  );
  await measure(
    '1 MiB sequential write (allocating)',
    1 << 20,
    (round) => {
      const p = image(`fresh-ours-${round}.qcow2`, false, SEQ_SIZE);
      return ours(p, SEQ_COUNT, 1 << 20, 1 << 20, true, SEQ_SIZE).finally(() => rmSync(p));
    },
    (round) => {
      const p = image(`fresh-qemu-${round}.qcow2`, false, SEQ_SIZE);
      try {
        return qemuBench(p, SEQ_COUNT, 1 << 20, 1 << 20, true);
      } finally {
        rmSync(p);
      }
    },
  );
  const report = new BenchReport('qcow2', 'ours');
  for (const [name, o, q] of rows) {
    report.add(name, 'ours', o, 'IOPS');
    report.add(name, 'qemu-img bench', q, 'IOPS');
  }
  report.note(
    `qcow2 (64 KiB clusters, ${SIZE >> 20} MiB image; ${SEQ_SIZE >> 20} MiB for the sequential write), medians of ${ROUNDS} runs, engine backend ${engine.backend}, qemu-img bench -i ${aio} -t writeback; one data buffer for all requests on both sides (as qemu-img bench has); target ratio ${TARGET}`,
  );
  report.flush();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
process.exit(0);
