import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { CLI, sh } from './support.ts';

const MIB = Number(process.env.VMDISK_BENCH_IMG_MIB ?? 1024);
const COUNT = String(Number(process.env.VMDISK_BENCH_IMG_COUNT ?? 100000));
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-img-bench-'));

/** The run time the tool printed. */
function reported(stdout: string): number {
  const m = /Run completed in ([\d.]+) seconds\./.exec(stdout);
  if (!m) throw new Error(`no run time in: ${stdout}`);
  return Number(m[1]);
}

const image = join(dir, 'bench.qcow2');
const ROWS = [
  { name: 'read 4k, depth 64', args: ['-c', COUNT, '-d', '64', '-s', '4k'] },
  { name: 'write 4k, depth 64', args: ['-w', '-c', COUNT, '-d', '64', '-s', '4k'] },
  {
    name: 'read 64k, depth 16, -t none -i io_uring',
    args: ['-c', COUNT, '-d', '16', '-s', '64k', '-t', 'none', '-i', 'io_uring'],
  },
  {
    name: 'write 64k, depth 16, -t none -i io_uring',
    args: ['-w', '-c', COUNT, '-d', '16', '-s', '64k', '-t', 'none', '-i', 'io_uring'],
  },
];
const TOOLS = [
  { name: 'vm-disk', run: (a: string[]) => sh(process.execPath, [CLI, 'bench', ...a]) },
  { name: 'qemu-img', run: (a: string[]) => sh('qemu-img', ['bench', ...a]) },
];

const report = new BenchReport('img-bench');
try {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc', image, `${MIB}M`]);
  console.log(`image: ${MIB} MiB qcow2, every cluster allocated, in ${dir}; ${COUNT} requests`);
  for (const row of ROWS) {
    const best = new Map<string, number>();
    for (let round = 0; round < 2; round++) {
      for (const tool of TOOLS) {
        const copy = join(dir, `${tool.name}.qcow2`);
        copyFileSync(image, copy);
        const s = reported(tool.run([...row.args, copy]));
        best.set(tool.name, Math.min(best.get(tool.name) ?? Number.POSITIVE_INFINITY, s));
        rmSync(copy, { force: true });
      }
    }
    for (const [tool, seconds] of best) report.add(row.name, tool, seconds, 's');
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
