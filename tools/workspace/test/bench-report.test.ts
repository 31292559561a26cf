// The benchmarks' reporter and charts (scripts/bench/): ratios read the same way whichever
// way the unit goes, the rows reach the collector's file, and a chart is well-formed SVG
// with a bar per figure.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { barChart } from '../../../scripts/bench/chart.ts';
import { BenchReport } from '../../../scripts/bench/report.ts';

describe('BenchReport', () => {
  afterEach(() => {
    vi.unstubAllEnvs();
    vi.restoreAllMocks();
  });

  it('gives each row ours against it, above 1 meaning ours is better, either way', () => {
    const r = new BenchReport('t');
    r.add('4k randread', 'vm-disk', 200, 'IOPS');
    r.add('4k randread', 'qemu-storage-daemon', 100, 'IOPS');
    r.add('RSS idle', 'vm-disk', 60, 'MB');
    r.add('RSS idle', 'qemu-storage-daemon', 10, 'MB');
    const rows = r.rows();
    expect(rows.map((x) => [x.workload, x.server, x.better, x.ratio])).toEqual([
      ['4k randread', 'vm-disk', 'higher', 1],
      ['4k randread', 'qemu-storage-daemon', 'higher', 2],
      ['RSS idle', 'vm-disk', 'lower', 1],
      ['RSS idle', 'qemu-storage-daemon', 'lower', 10 / 60],
    ]);
  });

  it('prints one table and appends its rows and notes to $VMDISK_BENCH_RESULTS', () => {
    const dir = mkdtempSync(join(tmpdir(), 'bench-report-'));
    try {
      const file = join(dir, 'rows.jsonl');
      vi.stubEnv('VMDISK_BENCH_RESULTS', file);
      const printed: string[] = [];
      vi.spyOn(console, 'log').mockImplementation((s: string) => printed.push(s));
      const r = new BenchReport('t', 'ours');
      r.add('w', 'ours', 3, 's');
      r.add('w', 'qemu-img', 6, 's');
      r.note('a note');
      r.flush();
      expect(printed[0]).toContain('| w | s | 3 | 6 | 2.00x |');
      expect(printed[1]).toBe('a note');
      const lines = readFileSync(file, 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l));
      expect(lines).toEqual([
        {
          bench: 't',
          workload: 'w',
          server: 'ours',
          figure: 3,
          unit: 's',
          better: 'lower',
          ratio: 1,
        },
        {
          bench: 't',
          workload: 'w',
          server: 'qemu-img',
          figure: 6,
          unit: 's',
          better: 'lower',
          ratio: 2,
        },
        { bench: 't', ours: 'ours', notes: ['a note'] },
      ]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('barChart', () => {
  it('draws a bar per figure, the longest for the largest of each workload', () => {
    const r = new BenchReport('t');
    r.add('a <&> b', 'vm-disk', 50, 'MiB/s');
    r.add('a <&> b', 'nbdkit file', 100, 'MiB/s');
    r.add('c', 'vm-disk', 7, 'IOPS');
    const svg = barChart('title', r.rows(), 'vm-disk');
    expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
    expect(svg.trim().endsWith('</svg>')).toBe(true);
    const widths = [...svg.matchAll(/<rect x="\d+" y="\d+" width="([\d.]+)"/g)].map((m) =>
      Number(m[1]),
    );
    expect(widths).toEqual([200, 400, 400]);
    expect(svg).toContain('a &lt;&amp;&gt; b');
    expect(svg).toContain('100 (vm-disk 0.50×)');
  });
});
