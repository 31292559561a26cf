// Benchmark of @vmdisk/engine against fio (io_uring and psync engines) and Node's own
// fs.read / FileHandle.read, same file, same run, one table with ratios.
//
// Cases: 4 KiB random read at queue depth 32 with (a) a hot page cache and (b) O_DIRECT;
// 128 KiB sequential read (hot); 4 KiB random write (buffered). fio gets --invalidate=0 in
// the hot cases so that it does not drop the page cache before its run (docs/testing.md).
//
// Each case runs ROUNDS times for BENCH_SECONDS, interleaved with the others of its group;
// the table shows the median round.
// Run: node bench/engine.bench.ts   (BENCH_SECONDS=n: length of a round; BENCH_ONLY=text:
// only the cases whose name contains it, e.g. BENCH_ONLY=O_DIRECT)
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import {
  closeSync,
  promises as fsp,
  mkdtempSync,
  openSync,
  read,
  readFileSync,
  rmSync,
  write,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { type BackendName, type Engine, type EngineFile, openEngine } from '../src/index.ts';

/** Rounds per case, and seconds per round. */
const ROUNDS = 3;
const SECONDS = Number(process.env.BENCH_SECONDS ?? 0.8);
const FILE_SIZE = 64 * 1024 * 1024;
const QD = 32;
const BACKENDS: BackendName[] = ['io_uring', 'aio', 'threadpool'];

interface Result {
  iops: number;
  mibs: number;
  /** CPU time of this process per I/O, user and system, in microseconds. */
  usr?: number;
  sys?: number;
}

type Op = (worker: number, seq: number) => Promise<unknown>;

/** Runs `op` from QD workers for SECONDS; counts completions. */
async function measure(bs: number, op: Op): Promise<Result> {
  let stop = false;
  let ops = 0;
  const timer = setTimeout(() => {
    stop = true;
  }, SECONDS * 1000);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: QD }, async (_, w) => {
      let seq = 0;
      while (!stop) {
        await op(w, seq++);
        ops++;
      }
    }),
  );
  const secs = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  clearTimeout(timer);
  return {
    iops: ops / secs,
    mibs: (ops * bs) / secs / 1048576,
    usr: cpu.user / ops,
    sys: cpu.system / ops,
  };
}

const randomOffset = (bs: number): number => Math.floor(Math.random() * (FILE_SIZE / bs)) * bs;

/** Sequential: each issue takes the next block of a shared cursor, wrapping at the end. */
function sequential(bs: number): () => number {
  let cursor = 0;
  return () => {
    const off = cursor;
    cursor = (cursor + bs) % FILE_SIZE;
    return off;
  };
}

function fio(
  path: string,
  engine: 'io_uring' | 'psync',
  rw: 'randread' | 'read' | 'randwrite',
  bs: number,
  direct: boolean,
): Result {
  const args = [
    '--name=bench',
    `--filename=${path}`,
    `--ioengine=${engine}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${engine === 'psync' ? 1 : QD}`,
    `--direct=${direct ? 1 : 0}`,
    '--invalidate=0',
    `--size=${FILE_SIZE}`,
    '--time_based',
    `--runtime=${SECONDS}`,
    '--output-format=json',
  ];
  const r = spawnSync('fio', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr || r.stdout}`);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  const side = rw === 'randwrite' ? job.write : job.read;
  return { iops: side.iops, mibs: side.bw / 1024 };
}

/** Our engine: one file, a pool of arena buffers (one per worker). */
async function ours(
  engine: Engine,
  f: EngineFile,
  bs: number,
  kind: 'read' | 'write',
  offsets: (bs: number) => number,
): Promise<Result> {
  const bufs = Array.from({ length: QD }, () => randomFillSync(engine.allocBuffer(bs)));
  return measure(bs, (w) =>
    kind === 'read' ? f.read(bufs[w]!, offsets(bs)) : f.write(bufs[w]!, offsets(bs)),
  );
}

function nodeFsRead(
  fd: number,
  bs: number,
  kind: 'read' | 'write',
  offsets: (bs: number) => number,
) {
  const bufs = Array.from({ length: QD }, () => randomFillSync(Buffer.alloc(bs)));
  return measure(
    bs,
    (w) =>
      new Promise<number>((resolve, reject) => {
        const cb = (e: Error | null, n: number) => (e ? reject(e) : resolve(n));
        if (kind === 'read') read(fd, bufs[w]!, 0, bs, offsets(bs), cb);
        else write(fd, bufs[w]!, 0, bs, offsets(bs), cb);
      }),
  );
}

async function fileHandleRead(
  path: string,
  bs: number,
  kind: 'read' | 'write',
  offsets: (bs: number) => number,
) {
  const fh = await fsp.open(path, 'r+');
  const bufs = Array.from({ length: QD }, () => randomFillSync(Buffer.alloc(bs)));
  const r = await measure(bs, (w) =>
    kind === 'read'
      ? fh.read(bufs[w]!, 0, bs, offsets(bs))
      : fh.write(bufs[w]!, 0, bs, offsets(bs)),
  );
  await fh.close();
  return r;
}

interface Row {
  group: string;
  name: string;
  r: Result;
}

function fmt(n: number | undefined, digits = 0): string {
  return n === undefined ? '' : n.toFixed(digits);
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vmdisk-engine-bench-'));
  const path = join(dir, 'bench.img');
  const rows: Row[] = [];
  const add = (group: string, name: string, r: Result): void => {
    rows.push({ group, name, r });
    process.stderr.write(`  ${group} / ${name}: ${fmt(r.iops)} IOPS\n`);
  };
  try {
    writeFileSync(path, randomFillSync(Buffer.alloc(FILE_SIZE)));
    readFileSync(path); // hot page cache
    const engines = new Map<BackendName, Engine>();
    for (const b of BACKENDS) engines.set(b, await openEngine({ backend: b, queueDepth: QD }));

    const groups: {
      group: string;
      bs: number;
      kind: 'read' | 'write';
      direct: boolean;
      offsets: () => (bs: number) => number;
      rw: 'randread' | 'read' | 'randwrite';
      psync: boolean;
      node: boolean;
    }[] = [
      {
        group: '4K randread QD32 hot',
        bs: 4096,
        kind: 'read',
        direct: false,
        offsets: () => randomOffset,
        rw: 'randread',
        psync: true,
        node: true,
      },
      {
        group: '4K randread QD32 O_DIRECT',
        bs: 4096,
        kind: 'read',
        direct: true,
        offsets: () => randomOffset,
        rw: 'randread',
        psync: true,
        node: false,
      },
      {
        group: '128K seqread QD32 hot',
        bs: 131072,
        kind: 'read',
        direct: false,
        offsets: () => sequential(131072),
        rw: 'read',
        psync: false,
        node: true,
      },
      {
        group: '4K randwrite QD32 buffered',
        bs: 4096,
        kind: 'write',
        direct: false,
        offsets: () => randomOffset,
        rw: 'randwrite',
        psync: false,
        node: true,
      },
    ];
    const only = process.env.BENCH_ONLY;
    for (const g of groups) {
      if (only && !g.group.includes(only)) continue;
      // Every implementation of a group runs once per round, rounds alternate, and each
      // gets the median of its rounds: load from other processes falls on all of them.
      const cases: { name: string; run: () => Promise<Result> }[] = [
        { name: 'fio io_uring', run: async () => fio(path, 'io_uring', g.rw, g.bs, g.direct) },
      ];
      if (g.psync) {
        cases.push({
          name: 'fio psync (QD1)',
          run: async () => fio(path, 'psync', g.rw, g.bs, g.direct),
        });
      }
      for (const b of BACKENDS) {
        cases.push({
          name: `engine ${b}`,
          run: async () => {
            const e = engines.get(b)!;
            const f = await e.openFile(path, { direct: g.direct });
            const r = await ours(e, f, g.bs, g.kind, g.offsets());
            await f.close();
            return r;
          },
        });
      }
      if (g.node) {
        cases.push({
          name: `Node fs.${g.kind}`,
          run: async () => {
            const fd = openSync(path, 'r+');
            const r = await nodeFsRead(fd, g.bs, g.kind, g.offsets());
            closeSync(fd);
            return r;
          },
        });
        cases.push({
          name: `Node FileHandle.${g.kind}`,
          run: () => fileHandleRead(path, g.bs, g.kind, g.offsets()),
        });
      }
      const results = new Map<string, Result[]>();
      for (let round = 0; round < ROUNDS; round++) {
        for (const c of cases) {
          const r = await c.run();
          results.set(c.name, [...(results.get(c.name) ?? []), r]);
        }
      }
      for (const c of cases) {
        const rs = [...results.get(c.name)!].sort((x, y) => x.iops - y.iops);
        add(g.group, c.name, rs[Math.floor(rs.length / 2)]!);
      }
    }
    for (const e of engines.values()) await e.close();
    const report = new BenchReport('engine', 'engine io_uring');
    for (const { group, name, r } of rows) {
      report.add(group, name, r.iops, 'IOPS');
      if (r.usr !== undefined && r.sys !== undefined)
        report.add(`${group}: CPU per I/O`, name, r.usr + r.sys, 'µs/IO');
    }
    report.note(
      `Median of ${ROUNDS} interleaved rounds of ${SECONDS} s per case, ${FILE_SIZE / 1048576} MiB file in ${tmpdir()}, ${QD} in flight ` +
        "(fio psync: 1). CPU µs/IO is this process's CPU time per I/O (ours and Node's; fio " +
        'runs in its own process). UV_THREADPOOL_SIZE=' +
        `${process.env.UV_THREADPOOL_SIZE ?? 4}. Figures from a shared, loaded 2-core machine.`,
    );
    report.flush();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
