// The `bench` target of a project: runs each bench/*.bench.ts of the current project in
// turn. A benchmark measures ours and its reference (fio, qemu-storage-daemon, nbdkit,
// Node's fs) in the same run and reports both through scripts/bench/report.ts.
// VMDISK_BENCH_ONLY=serve,nbd runs only those (file names without .bench.ts); scripts/bench.ts
// runs every project's and collects the results.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const dir = join(process.cwd(), 'bench');
const only = process.env.VMDISK_BENCH_ONLY?.split(',').map((s) => s.trim());
const files = existsSync(dir)
  ? readdirSync(dir)
      .filter((f) => f.endsWith('.bench.ts'))
      .filter((f) => only === undefined || only.includes(f.slice(0, -'.bench.ts'.length)))
      .sort()
  : [];
if (files.length === 0) console.log(`${process.cwd()}: no benchmarks to run (bench/*.bench.ts)`);
for (const file of files) {
  console.log(`\n== ${file}`);
  const { status } = spawnSync(process.execPath, [join(dir, file)], { stdio: 'inherit' });
  if (status !== 0) process.exit(status ?? 1);
}
