// The `bench` target of a project: runs each bench/*.bench.ts of the current project in
// turn. A benchmark measures ours and its reference (fio, qemu-storage-daemon, nbdkit,
// Node's fs) in the same run and prints both figures and their ratio.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const dir = join(process.cwd(), 'bench');
const files = existsSync(dir)
  ? readdirSync(dir)
      .filter((f) => f.endsWith('.bench.ts'))
      .sort()
  : [];
if (files.length === 0) console.log(`${process.cwd()}: no benchmarks (bench/*.bench.ts)`);
for (const file of files) {
  console.log(`\n== ${file}`);
  const { status } = spawnSync(process.execPath, [join(dir, file)], { stdio: 'inherit' });
  if (status !== 0) process.exit(status ?? 1);
}
