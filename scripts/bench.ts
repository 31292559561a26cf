// Every benchmark in one command, and its results as files people can look at:
//
//   npm run bench                      # all of them (nx run-many -t bench, one at a time)
//   npm run bench -- --only serve,nbd  # some (bench file names without .bench.ts)
//   npm run bench -- --out /tmp/b      # elsewhere than docs/bench
//   npm run bench -- --charts           # only redraw the charts of results.json
//
// The benchmarks report through scripts/bench/report.ts, which appends their rows to the
// file named by VMDISK_BENCH_RESULTS; this sets it, runs them, then writes
// <out>/results.json (the rows, each bench's notes, the machine) and <out>/<bench>.svg.
// With --only, the other benchmarks' rows already in results.json are kept.
// Benchmarks load the machine: run them on a quiet one.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { barChart } from './bench/chart.ts';
import type { BenchMeta, BenchRow } from './bench/report.ts';

interface Results {
  machine: Record<string, string | number>;
  command: string;
  benches: Record<string, BenchMeta & { date: string }>;
  rows: (BenchRow & { date: string })[];
}

const root = resolve(import.meta.dirname, '..');
const { values } = parseArgs({
  options: { only: { type: 'string' }, out: { type: 'string' }, charts: { type: 'boolean' } },
});
const out = resolve(values.out ?? join(root, 'docs/bench'));
const resultsPath = join(out, 'results.json');

function machine(): Record<string, string | number> {
  const model = /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1];
  return {
    cpu: model ?? cpus()[0]?.model ?? 'unknown',
    cores: cpus().length,
    memory: `${Math.round(totalmem() / 2 ** 30)} GiB`,
    kernel: release(),
    node: process.version,
    date: new Date().toISOString(),
  };
}

function drawCharts(results: Results, names: Iterable<string>): void {
  for (const name of names) {
    const meta = results.benches[name]!;
    const rows = results.rows.filter((r) => r.bench === name);
    const m = results.machine;
    const title = `${name}: ${m.cpu}, ${m.cores} cores, ${meta.date.slice(0, 10)}`;
    writeFileSync(join(out, `${name}.svg`), barChart(title, rows, meta.ours));
  }
}

if (values.charts) {
  const results = JSON.parse(readFileSync(resultsPath, 'utf8')) as Results;
  drawCharts(results, Object.keys(results.benches));
  process.exit(0);
}

const scratch = mkdtempSync(join(tmpdir(), 'vmdisk-bench-'));
const rowsFile = join(scratch, 'rows.jsonl');
writeFileSync(rowsFile, '');
try {
  const r = spawnSync(
    'npx',
    ['nx', 'run-many', '-t', 'bench', '--parallel=1', '--outputStyle=stream'],
    {
      cwd: root,
      stdio: 'inherit',
      env: {
        ...process.env,
        VMDISK_BENCH_RESULTS: rowsFile,
        ...(values.only !== undefined && { VMDISK_BENCH_ONLY: values.only }),
      },
    },
  );
  if (r.status !== 0) console.error(`benchmarks exited ${r.status}: writing what they reported`);
  const date = new Date().toISOString();
  const previous: Results | undefined =
    values.only !== undefined && existsSync(resultsPath)
      ? (JSON.parse(readFileSync(resultsPath, 'utf8')) as Results)
      : undefined;
  const results: Results = {
    machine: machine(),
    command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    benches: {},
    rows: [],
  };
  for (const line of readFileSync(rowsFile, 'utf8').split('\n')) {
    if (line === '') continue;
    const item = JSON.parse(line) as BenchRow | BenchMeta;
    if ('notes' in item) results.benches[item.bench] = { ...item, date };
    else results.rows.push({ ...item, date });
  }
  const fresh = new Set(Object.keys(results.benches));
  if (previous) {
    for (const [name, meta] of Object.entries(previous.benches))
      if (!fresh.has(name)) results.benches[name] = meta;
    results.rows.push(...previous.rows.filter((r) => !fresh.has(r.bench)));
  }
  mkdirSync(out, { recursive: true });
  writeFileSync(resultsPath, `${JSON.stringify(results, null, 2)}\n`);
  drawCharts(results, fresh);
  console.log(`\n${results.rows.length} rows: ${resultsPath}; charts: ${out}/*.svg`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
