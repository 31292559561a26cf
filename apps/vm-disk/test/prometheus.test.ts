// A real Prometheus (Debian's `prometheus`) scrapes `vm-disk serve --metrics` every second
// while fio writes through the NBD export; the write rate Prometheus computes over fio's
// run matches the IOPS fio reports, within 10%. Prometheus gets a temporary config and
// storage directory and a free port; the test waits on its HTTP API for the samples.
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { run, start, useScratch, waitFor } from './harness/daemon.ts';
import { httpGet, serveWithMetrics } from './harness/metrics.ts';

const scratch = useScratch('vmdisk-prometheus-');
// fio's figures leave its first seconds out (ramp_time: the daemon's code warming up).
const RAMP_S = 2;
const RUNTIME_S = 10;

/** A port no one listens on now (the kernel's pick, released). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

type Vector = { value: [number, string] }[];

/** An instant query of Prometheus's HTTP API at `time` (seconds). */
async function query(port: number, promql: string, time: number): Promise<Vector> {
  const q = `/api/v1/query?query=${encodeURIComponent(promql)}&time=${time}`;
  const reply = JSON.parse((await httpGet({ port }, q)).body) as {
    status: string;
    data: { result: Vector };
  };
  if (reply.status !== 'success') throw new Error(`prometheus: ${JSON.stringify(reply)}`);
  return reply.data.result;
}

describe('Prometheus scraping vm-disk', () => {
  it('reports the write rate fio measured, within 10%', { timeout: 120_000 }, async () => {
    const { nbd, port } = await serveWithMetrics(scratch, '256M');
    const promPort = await freePort();
    const config = scratch.path('prometheus.yml');
    writeFileSync(
      config,
      [
        'global:',
        '  scrape_interval: 1s',
        '  evaluation_interval: 1s',
        'scrape_configs:',
        '  - job_name: vm-disk',
        '    static_configs:',
        `      - targets: ['127.0.0.1:${port}']`,
        '',
      ].join('\n'),
    );
    const prometheus = start('prometheus', [
      `--config.file=${config}`,
      `--storage.tsdb.path=${scratch.path('tsdb')}`,
      `--web.listen-address=127.0.0.1:${promPort}`,
    ]);
    scratch.running.push(prometheus);
    const series = 'vmdisk_node_requests_total{node="d0",operation="write"}';
    // Prometheus is up and has scraped vm-disk once (the counter at 0) before the load.
    let upAt = 0;
    await waitFor(
      'Prometheus to scrape vm-disk',
      () => {
        void query(promPort, series, Date.now() / 1000).then(
          (r) => {
            if (r.length > 0 && upAt === 0) upAt = Date.now();
          },
          () => {},
        );
        return upAt > 0;
      },
      60_000,
    );
    const out = await run(
      'fio',
      [
        '--name=prom',
        '--ioengine=nbd',
        `--uri=nbd+unix:///d0?socket=${nbd}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=8',
        '--size=64M',
        `--ramp_time=${RAMP_S}`,
        `--runtime=${RUNTIME_S}`,
        '--time_based',
        '--output-format=json',
      ],
      120_000,
    );
    const report = JSON.parse(out.slice(out.indexOf('{'))) as {
      timestamp_ms: number;
      jobs: { job_runtime: number; write: { iops: number; total_ios: number } }[];
    };
    const job = report.jobs[0]!;
    // fio's I/O ran for job_runtime ms up to its report (timestamp_ms: when it ended).
    const ended = report.timestamp_ms / 1000;
    const runtime = job.job_runtime / 1000;
    const fioIops = job.write.iops;
    expect(job.write.total_ios).toBeGreaterThan(0);
    // Wait for a scrape after fio ended: the counter has its final value in Prometheus.
    let final = 0;
    await waitFor(
      'a scrape after the run',
      () => {
        void query(promPort, `timestamp(${series})`, Date.now() / 1000).then(
          (r) => {
            if (Number(r[0]?.value[1] ?? 0) > ended) final = 1;
          },
          () => {},
        );
        return final > 0;
      },
      30_000,
    );
    // The rate over fio's run, as a dashboard would ask it.
    const window = `${Math.round(runtime * 1000)}ms`;
    const rate = await query(promPort, `rate(${series}[${window}])`, ended);
    const promIops = Number(rate[0]?.value[1]);
    const total = await query(promPort, series, ended + 2);
    expect(Number(total[0]?.value[1])).toBeGreaterThanOrEqual(job.write.total_ios);
    // The Grafana dashboard's queries are PromQL this Prometheus accepts, each with data.
    const dashboard = JSON.parse(
      readFileSync(new URL('../grafana/vm-disk.json', import.meta.url), 'utf8'),
    ) as { panels: { title: string; targets?: { expr: string }[] }[] };
    for (const panel of dashboard.panels) {
      for (const { expr } of panel.targets ?? []) {
        const promql = expr
          .replaceAll('$__rate_interval', '5s')
          .replace(/\$(job|node|export)\b/g, '.*');
        const result = await query(promPort, promql, ended);
        expect(result.length, `${panel.title}: ${promql}`).toBeGreaterThan(0);
      }
    }
    expect(
      Math.abs(promIops - fioIops) / fioIops,
      `Prometheus ${promIops}, fio ${fioIops}`,
    ).toBeLessThan(0.1);
  });
});
