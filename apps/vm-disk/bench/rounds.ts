// What the daemon-against-daemon benchmarks (rbd, no-file, tls) share: a run's figure and
// the server's CPU per I/O, rounds in which the server that goes first alternates, and
// the median of each reported (throughput rows first, then the CPU rows of the same runs).
// Not a benchmark itself (no .bench.ts).
import type { BenchReport } from '../../../scripts/bench/report.ts';
import {
  cpuSeconds,
  type DaemonName,
  type FioJob,
  fio,
  spread,
  startDaemon,
  stop,
  waitForSocket,
} from './support.ts';

/** A workload: fio's rw and block size at an iodepth; `name` is its row. */
export interface Workload {
  name: string;
  rw: string;
  bs: string;
  depth: number;
}

/** One run of a server: IOPS (4 KiB) or MiB/s, and the server's CPU µs per I/O. */
export interface ServerRun {
  figure: number;
  cpuPerIo: number;
}

/** A run's figures from fio's job and the CPU seconds the server used during it. */
export function serverRun(job: FioJob, w: Workload, cpuUsed: number): ServerRun {
  const side = w.rw.includes('write') ? job.write : job.read;
  return {
    figure: w.bs === '4k' ? side.iops : side.bw / 1024,
    cpuPerIo: (cpuUsed * 1e6) / Math.max(1, side.total_ios),
  };
}

/**
 * Starts `server` with `args`, runs fio on `sock` once it listens (`fioOpts` added to the
 * workload's), stops it: the run's figures.
 */
export async function fioOnDaemon(
  server: DaemonName,
  args: string[],
  sock: string,
  w: Workload,
  fioOpts: Omit<Parameters<typeof fio>[1], 'rw' | 'bs' | 'iodepth'>,
): Promise<ServerRun> {
  const child = startDaemon(server, args);
  try {
    await waitForSocket(sock, child);
    const before = cpuSeconds(child.pid as number);
    const job = await fio(sock, { rw: w.rw, bs: w.bs, iodepth: w.depth, ...fioOpts });
    return serverRun(job, w, cpuSeconds(child.pid as number) - before);
  } finally {
    await stop(child);
  }
}

/** The median of a server's runs of one workload. */
export interface MedianRow {
  row: string;
  server: DaemonName;
  unit: string;
  figure: number;
  cpuPerIo: number;
}

/**
 * Runs each workload `rounds` times for each server, the first alternating by round (what
 * a run leaves behind falls on the next), and prints each median with its min-max. `row`
 * names a workload's row (its name by default).
 */
export async function alternatedRounds<W extends Workload>(
  servers: readonly DaemonName[],
  workloads: readonly W[],
  rounds: number,
  measure: (server: DaemonName, w: W) => Promise<ServerRun>,
  row: (w: W) => string = (w) => w.name,
): Promise<MedianRow[]> {
  const out: MedianRow[] = [];
  for (const w of workloads) {
    const runs = new Map<DaemonName, ServerRun[]>(servers.map((s) => [s, []]));
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? servers : [...servers].reverse();
      for (const s of order) runs.get(s)!.push(await measure(s, w));
    }
    const unit = w.bs === '4k' ? 'IOPS' : 'MiB/s';
    for (const [server, rs] of runs) {
      const fig = spread(rs.map((r) => r.figure));
      const cpu = spread(rs.map((r) => r.cpuPerIo));
      console.log(
        `  ${row(w)} ${server}: ${fig.median.toFixed(0)} ${unit} (${fig.min.toFixed(0)}-${fig.max.toFixed(0)}), CPU ${cpu.median.toFixed(0)} µs/IO (${cpu.min.toFixed(0)}-${cpu.max.toFixed(0)})`,
      );
      out.push({ row: row(w), server, unit, figure: fig.median, cpuPerIo: cpu.median });
    }
  }
  return out;
}

/** The medians as rows: the figures, then the CPU rows of the same runs. */
export function reportMedians(report: BenchReport, rows: readonly MedianRow[]): void {
  for (const r of rows) report.add(r.row, r.server, r.figure, r.unit);
  for (const r of rows) report.add(`${r.row}: server CPU`, r.server, r.cpuPerIo, 'µs/IO', 'lower');
}
