// Benchmark of the block graph's overhead: 4 KiB random read at queue depth 32 with a hot
// page cache, through a BlockBackend on `raw` over `file`, against the engine alone
// (EngineFile.read) on the same file, with the same engine, in the same run. Target: the
// graph costs at most 15% of the engine's IOPS.
//
// Rounds of the two alternate (engine, graph, engine, graph, ...); the figures are the
// medians. Run: node bench/block-graph.bench.ts (BENCH_SECONDS=n: length of a round,
// BENCH_ROUNDS=n).
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sharedEngine } from '@vmdisk/engine';
import { BlockGraph } from '../src/index.ts';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 1);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const FILE_SIZE = 64 * 1024 * 1024;
const BS = 4096;
const QD = 32;
const TARGET = 15;

type Read = (buf: Buffer, offset: number) => Promise<unknown>;

/** QD workers reading random 4 KiB blocks for SECONDS; IOPS. */
async function measure(read: Read, bufs: Buffer[]): Promise<number> {
  const blocks = FILE_SIZE / BS;
  let stop = false;
  let ops = 0;
  const timer = setTimeout(() => {
    stop = true;
  }, SECONDS * 1000);
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
  return ops / ((performance.now() - t0) / 1000);
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
  const engineIops: number[] = [];
  const graphIops: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    engineIops.push(await measure(engineRead, bufs));
    graphIops.push(await measure(graphRead, bufs));
  }
  const e = median(engineIops);
  const gr = median(graphIops);
  const overhead = (e / gr - 1) * 100;
  const row = (name: string, iops: number, all: number[]) =>
    `${name.padEnd(34)} ${Math.round(iops).toString().padStart(9)} IOPS ${((iops * BS) / 2 ** 20).toFixed(1).padStart(8)} MiB/s   rounds: ${all.map((x) => Math.round(x)).join(', ')}`;
  console.log(
    `4 KiB random read, QD ${QD}, hot cache, ${FILE_SIZE >> 20} MiB file, engine backend ${engine.backend}`,
  );
  console.log(`${ROUNDS} rounds of ${SECONDS} s each, medians:`);
  console.log(row('engine alone (EngineFile.read)', e, engineIops));
  console.log(row('graph: BlockBackend > raw > file', gr, graphIops));
  console.log(
    `graph/engine IOPS ratio ${(gr / e).toFixed(3)}; overhead ${overhead.toFixed(1)}% (target <= ${TARGET}%): ${overhead <= TARGET ? 'OK' : 'OVER TARGET'}`,
  );
  for (const b of bufs) engine.releaseBuffer(b);
  await g.close();
  await file.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
process.exit(0);
