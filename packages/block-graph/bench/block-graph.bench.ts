// Benchmark of the block graph's overhead: 4 KiB random read at queue depth 32 with a hot
// page cache, through a BlockBackend on `raw` over `file`, against the engine alone
// (EngineFile.read) on the same file, with the same engine, in the same run. Target: the
// graph costs at most 15% of the engine's IOPS.
//
// The machine is shared, so the load changes from second to second: the two are measured
// in many short slices, alternating (engine then graph, graph then engine, ...), and each
// pair of neighbouring slices gives one ratio; the figures are the medians. CPU time per
// I/O (user + system of this process) is shown too: it is what the graph adds, whatever the
// other processes do. Run: node bench/block-graph.bench.ts (BENCH_SLICE=seconds per slice,
// BENCH_PAIRS=n).
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sharedEngine } from '@vmdisk/engine';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { BlockGraph } from '../src/index.ts';

const SLICE = Number(process.env.BENCH_SLICE ?? 0.2);
const PAIRS = Number(process.env.BENCH_PAIRS ?? 16);
const FILE_SIZE = 64 * 1024 * 1024;
const BS = 4096;
const QD = 32;
const TARGET = 15;

type Read = (buf: Buffer, offset: number) => Promise<unknown>;

interface Slice {
  iops: number;
  /** CPU microseconds (user + system) per I/O. */
  cpu: number;
}

/** QD workers reading random 4 KiB blocks for SLICE seconds. */
async function measure(read: Read, bufs: Buffer[]): Promise<Slice> {
  const blocks = FILE_SIZE / BS;
  let stop = false;
  let ops = 0;
  const timer = setTimeout(() => {
    stop = true;
  }, SLICE * 1000);
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    bufs.map(async (buf, w) => {
      let x = (w + 1) * 2654435761;
      while (!stop) {
        x = (x * 1103515245 + 12345) >>> 0;
        await read(buf, (x % blocks) * BS);
        ops++;
      }
    }),
  );
  clearTimeout(timer);
  const secs = (performance.now() - t0) / 1000;
  const c = process.cpuUsage(c0);
  return { iops: ops / secs, cpu: (c.user + c.system) / ops };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const dir = mkdtempSync(join(tmpdir(), 'block-graph-bench-'));
const path = join(dir, 'bench.img');
try {
  const data = Buffer.alloc(FILE_SIZE);
  randomFillSync(data);
  writeFileSync(path, data);
  readFileSync(path); // hot cache

  const engine = await sharedEngine('auto');
  const file = await engine.openFile(path, { readOnly: true });
  const g = new BlockGraph();
  await g.add({
    driver: 'raw',
    'node-name': 'disk',
    'read-only': true,
    file: { driver: 'file', filename: path, aio: engine.backend },
  });
  const backend = await g.createBackend('disk');
  const bufs = Array.from({ length: QD }, () => engine.allocBuffer(BS));

  const engineRead: Read = (buf, off) => file.read(buf, off);
  const graphRead: Read = (buf, off) => backend.read(off, buf);
  // Warm-up of both paths (JIT, arena, ring).
  const warm = Number(process.env.BENCH_WARMUP ?? 0.3);
  for (const r of [engineRead, graphRead]) {
    const t = performance.now();
    while (performance.now() - t < warm * 1000) {
      await Promise.all(bufs.map((b, i) => r(b, i * BS)));
    }
  }
  const engineSlices: Slice[] = [];
  const graphSlices: Slice[] = [];
  const ratios: number[] = [];
  for (let pair = 0; pair < PAIRS; pair++) {
    const first = pair % 2 === 0;
    const a = await measure(first ? engineRead : graphRead, bufs);
    const b = await measure(first ? graphRead : engineRead, bufs);
    const [e, gr] = first ? [a, b] : [b, a];
    engineSlices.push(e);
    graphSlices.push(gr);
    ratios.push(gr.iops / e.iops);
  }
  const e = median(engineSlices.map((x) => x.iops));
  const gr = median(graphSlices.map((x) => x.iops));
  const eCpu = median(engineSlices.map((x) => x.cpu));
  const gCpu = median(graphSlices.map((x) => x.cpu));
  const ratio = median(ratios);
  const overhead = (1 / ratio - 1) * 100;
  const report = new BenchReport('block-graph', 'graph');
  const w = `4k randread QD ${QD}, hot`;
  report.add(w, 'graph', gr, 'IOPS');
  report.add(w, 'engine alone', e, 'IOPS');
  report.add(`${w}: CPU per I/O`, 'graph', gCpu, 'µs/IO');
  report.add(`${w}: CPU per I/O`, 'engine alone', eCpu, 'µs/IO');
  report.note(
    `graph = BlockBackend > raw > file; ${FILE_SIZE >> 20} MiB file, engine backend ${engine.backend}; ` +
      `${PAIRS} pairs of ${SLICE} s slices, alternating, medians; graph/engine ratio (median of pairs) ` +
      `${ratio.toFixed(3)}: overhead ${overhead.toFixed(1)}% (target <= ${TARGET}%): ${overhead <= TARGET ? 'OK' : 'OVER TARGET'}`,
  );
  report.flush();
  for (const b of bufs) engine.releaseBuffer(b);
  await g.close();
  await file.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
process.exit(0);
