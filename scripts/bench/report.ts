// The one way a benchmark reports its figures. Each bench makes a BenchReport, adds one row
// per (workload, server) figure, and calls flush(): that prints one markdown table (a column
// per server, then ours over each reference) and, when VMDISK_BENCH_RESULTS names a file
// (scripts/bench.ts sets it), appends the rows to it as JSON lines, for the collector.
//
// `ratio` is always ours "speed" against that server: above 1, ours is better, whichever
// way the unit goes (higher-is-better: ours / theirs; lower-is-better: theirs / ours).
import { appendFileSync } from 'node:fs';

export type Better = 'higher' | 'lower';

export interface BenchRow {
  /** The benchmark file's name without .bench.ts (serve, nbd, engine, ...). */
  bench: string;
  workload: string;
  server: string;
  figure: number;
  unit: string;
  better: Better;
  /** Ours against this server, above 1: ours better (1 on our own row). */
  ratio?: number;
}

/** What a benchmark says of itself besides its rows: whose the ratios are, its notes. */
export interface BenchMeta {
  bench: string;
  ours: string;
  notes: string[];
}

/** Units whose smaller figure is the better one. */
const LOWER_IS_BETTER = new Set(['s', 'ms', 'MiB', 'MB', 'µs/IO']);

export class BenchReport {
  readonly #rows: BenchRow[] = [];
  readonly #notes: string[] = [];

  /**
   * @param bench the benchmark's name (its file name without .bench.ts)
   * @param ours the server name of our own rows (the others are references)
   */
  readonly bench: string;
  readonly ours: string;

  constructor(bench: string, ours = 'vm-disk') {
    this.bench = bench;
    this.ours = ours;
  }

  /** One figure; `better` defaults from the unit (s, MiB: lower; IOPS, MiB/s: higher). */
  add(workload: string, server: string, figure: number, unit: string, better?: Better): void {
    this.#rows.push({
      bench: this.bench,
      workload,
      server,
      figure,
      unit,
      better: better ?? (LOWER_IS_BETTER.has(unit) ? 'lower' : 'higher'),
    });
  }

  /** A line of context printed under the table (image size, pinning, rounds). */
  note(text: string): void {
    this.#notes.push(text);
  }

  /** The rows with their ratios, in the order added. */
  rows(): BenchRow[] {
    return this.#rows.map((r) => {
      const ours = this.#rows.find((o) => o.workload === r.workload && o.server === this.ours);
      if (ours === undefined || r.figure === 0 || ours.figure === 0) return { ...r };
      const ratio = r.better === 'higher' ? ours.figure / r.figure : r.figure / ours.figure;
      return { ...r, ratio };
    });
  }

  /** Prints the table and notes; appends the rows to $VMDISK_BENCH_RESULTS if set. */
  flush(): void {
    const rows = this.rows();
    console.log(table(rows, this.ours));
    for (const n of this.#notes) console.log(n);
    const out = process.env.VMDISK_BENCH_RESULTS;
    if (out) {
      appendFileSync(out, rows.map((r) => `${JSON.stringify(r)}\n`).join(''));
      const meta: BenchMeta = { bench: this.bench, ours: this.ours, notes: this.#notes };
      appendFileSync(out, `${JSON.stringify(meta)}\n`);
    }
  }
}

const fmt = (n: number): string =>
  Math.abs(n) >= 1000 ? String(Math.round(n)) : Number(n.toPrecision(3)).toString();

/** A markdown table: a row per workload, a column per server, then ours over the others. */
export function table(rows: readonly BenchRow[], ours: string): string {
  const workloads = [...new Set(rows.map((r) => r.workload))];
  const servers = [...new Set(rows.map((r) => r.server))];
  const others = servers.filter((s) => s !== ours);
  const head = ['workload', 'unit', ...servers, ...others.map((s) => `${ours} / ${s}`)];
  const lines = [`| ${head.join(' | ')} |`, `|${'---|'.repeat(head.length)}`];
  for (const w of workloads) {
    const of = (s: string) => rows.find((r) => r.workload === w && r.server === s);
    const unit = rows.find((r) => r.workload === w)!.unit;
    const cells = servers.map((s) => {
      const r = of(s);
      return r === undefined ? '-' : fmt(r.figure);
    });
    const ratios = others.map((s) => {
      const ratio = of(s)?.ratio;
      return ratio === undefined ? '-' : `${ratio.toFixed(2)}x`;
    });
    lines.push(`| ${[w, unit, ...cells, ...ratios].join(' | ')} |`);
  }
  return `\n${lines.join('\n')}`;
}
