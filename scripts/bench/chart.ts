// SVG bar charts of benchmark rows: per workload, a bar per server, scaled to that workload's
// largest figure (workloads have different units), each labelled with its figure and ours
// over it. Written here rather than with a charting library: it is ~100 lines, the output
// is a plain diffable file with no script or fonts to fetch, and it adds no dependency to
// keep up to date (the libraries that draw SVG without a browser pull in a DOM or a canvas).
import type { BenchRow } from './report.ts';

const WIDTH = 760;
const LABEL = 190;
const BAR_MAX = 400;
const BAR = 16;
const GAP = 4;
const HEAD = 22;
const SPACE = 14;

/** Fixed colours for the servers that recur; others take the rest in turn. */
const KNOWN: Record<string, string> = {
  'vm-disk': '#2563eb',
  ours: '#2563eb',
  'qemu-storage-daemon': '#ea580c',
  'qemu-nbd': '#ea580c',
  'qemu-img': '#ea580c',
  'nbdkit file': '#16a34a',
};
const OTHERS = ['#7c3aed', '#6b7280', '#0891b2', '#ca8a04', '#db2777'];

const esc = (s: string): string =>
  s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

const fmt = (n: number): string =>
  Math.abs(n) >= 1000 ? Math.round(n).toLocaleString('en-US') : Number(n.toPrecision(3)).toString();

/** One chart of one benchmark's rows; `ours` is the server the ratios are of. */
export function barChart(title: string, rows: readonly BenchRow[], ours: string): string {
  const workloads = [...new Set(rows.map((r) => r.workload))];
  const servers = [...new Set(rows.map((r) => r.server))];
  const colour = new Map<string, string>();
  let next = 0;
  for (const s of servers) colour.set(s, KNOWN[s] ?? OTHERS[next++ % OTHERS.length]!);
  const out: string[] = [];
  let y = 34;
  for (const w of workloads) {
    const of = rows.filter((r) => r.workload === w);
    const max = Math.max(...of.map((r) => r.figure));
    const first = of[0]!;
    out.push(
      `<text x="8" y="${y + 14}" class="w">${esc(w)}</text>` +
        `<text x="${WIDTH - 8}" y="${y + 14}" class="u" text-anchor="end">${esc(first.unit)}, ${first.better} is better</text>`,
    );
    y += HEAD;
    for (const r of of) {
      const len = max > 0 ? Math.max(1, (r.figure / max) * BAR_MAX) : 1;
      const ratio =
        r.server !== ours && r.ratio !== undefined ? ` (${ours} ${r.ratio.toFixed(2)}×)` : '';
      out.push(
        `<text x="${LABEL - 6}" y="${y + BAR - 4}" text-anchor="end">${esc(r.server)}</text>` +
          `<rect x="${LABEL}" y="${y}" width="${len.toFixed(1)}" height="${BAR}" fill="${colour.get(r.server)}"/>` +
          `<text x="${(LABEL + len + 6).toFixed(1)}" y="${y + BAR - 4}">${fmt(r.figure)}${esc(ratio)}</text>`,
      );
      y += BAR + GAP;
    }
    y += SPACE;
  }
  out.push(
    `<text x="8" y="${y + 4}" class="u">${esc(`(${ours} n×): ${ours} against that server, above 1: ${ours} better`)}</text>`,
  );
  y += 16;
  const height = y + 6;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="sans-serif" font-size="12">`,
    '<style>.w{font-weight:bold}.u{fill:#555}.t{font-size:15px;font-weight:bold}</style>',
    `<rect width="${WIDTH}" height="${height}" fill="#fff"/>`,
    `<text x="8" y="20" class="t">${esc(title)}</text>`,
    ...out,
    '</svg>',
    '',
  ].join('\n');
}
