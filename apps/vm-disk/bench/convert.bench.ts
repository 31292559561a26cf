// `vm-disk convert` against `qemu-img convert` with the same options (-m 16 -W, as fast as
// qemu-img goes), on a 2 GiB image (VMDISK_BENCH_CONVERT_MIB sets another size) with 50%
// data (1 MiB of data every other MiB, half of each 4 KiB random and half text, so that it
// compresses about as a disk does) in /tmp: raw -> qcow2, qcow2 -> raw, qcow2 -> compressed
// qcow2, and NBD -> qcow2 (the raw image served by a qemu-nbd started for each run). Tools
// take turns, best of 2
// rounds; seconds, and qemu-img's time over ours (above 1: we are faster).
// VMDISK_BENCH_CONVERT_ROW=text runs only the rows whose name contains it.
// Each run starts with nothing dirty (sync before it: a run that follows a GiB of dirty
// pages, such as the sources just made, has its buffered writes throttled while they are
// written back), and the tool that goes first changes each round (a run right after the
// other's output was deleted reuses its page cache pages, which a VM's host may otherwise
// have to fault in again: measured at up to 5x the sys time of the same copy).
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { CLI, sh } from './support.ts';

// A multiplication, not << 20: 2048 << 20 overflows to a negative 32-bit number.
const SIZE = Number(process.env.VMDISK_BENCH_CONVERT_MIB ?? 2048) * 2 ** 20;
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-convert-bench-'));

/** The source: every other MiB data, the rest a hole. */
function makeRaw(path: string): void {
  const mib = Buffer.alloc(1 << 20);
  const text = Buffer.from('the quick brown fox jumps over the lazy dog; '.repeat(50));
  for (let at = 0; at < mib.length; at += 4096) {
    randomFillSync(mib, at, 2048);
    text.copy(mib, at + 2048, 0, 2048);
  }
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, SIZE);
    for (let at = 0; at < SIZE; at += 2 << 20) {
      mib.writeUInt32BE(Math.floor(at / 2 ** 20), 0);
      writeSync(fd, mib, 0, mib.length, at);
    }
  } finally {
    closeSync(fd);
  }
}

/** Waits `ms` (a script, before the measured runs: blocking is fine). */
function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function seconds(cmd: string, args: string[]): number {
  const start = process.hrtime.bigint();
  sh(cmd, args);
  return Number(process.hrtime.bigint() - start) / 1e9;
}

const raw = join(dir, 'src.raw');
const qcow2 = join(dir, 'src.qcow2');
// The NBD source: the raw image served by qemu-nbd (a third party to both tools).
const nbdSocket = join(dir, 'nbd.sock');
const nbdUri = `nbd+unix:///?socket=${nbdSocket}`;
const ROWS = [
  { name: 'raw -> qcow2', args: ['-O', 'qcow2', raw] },
  { name: 'qcow2 -> raw', args: ['-O', 'raw', qcow2] },
  { name: 'qcow2 -> compressed qcow2', args: ['-c', '-O', 'qcow2', qcow2] },
  { name: 'NBD (qemu-nbd) -> qcow2', args: ['-f', 'raw', '-O', 'qcow2', nbdUri], nbd: true },
];
const TOOLS = [
  { name: 'vm-disk', run: (a: string[]) => seconds(process.execPath, [CLI, 'convert', ...a]) },
  { name: 'qemu-img', run: (a: string[]) => seconds('qemu-img', ['convert', ...a]) },
];

/**
 * A qemu-nbd of its own for each run: one process serving client after client changes how
 * it serves them (its allocator's state: after a few clients, qemu-img's requests cost it
 * 0.55 s of CPU per GiB and ours 0.95 s; from a fresh process both ~0.95 s).
 */
function startQemuNbd(): ChildProcess {
  rmSync(nbdSocket, { force: true });
  const p = spawn('qemu-nbd', ['-r', '-t', '-e', '32', '-f', 'raw', '-k', nbdSocket, raw], {
    stdio: 'ignore',
  });
  for (let i = 0; i < 200 && !existsSync(nbdSocket); i++) sleepMs(25);
  return p;
}

function stopQemuNbd(p: ChildProcess | undefined): undefined {
  p?.kill('SIGKILL');
  sleepMs(50);
  return undefined;
}

const report = new BenchReport('convert');
let qemuNbd: ChildProcess | undefined;
try {
  makeRaw(raw);
  sh('qemu-img', ['convert', '-O', 'qcow2', raw, qcow2]);
  console.log(`source: ${SIZE / 2 ** 20} MiB, 50% data, in ${dir}`);
  for (const row of ROWS.filter((r) =>
    r.name.includes(process.env.VMDISK_BENCH_CONVERT_ROW ?? ''),
  )) {
    const best = new Map<string, number>();
    for (let round = 0; round < 2; round++) {
      for (const tool of round % 2 === 0 ? TOOLS : [...TOOLS].reverse()) {
        const out = join(dir, 'out');
        rmSync(out, { force: true });
        sh('sync', []);
        if (row.nbd) qemuNbd = startQemuNbd();
        const s = tool.run(['-m', '16', '-W', ...row.args, out]);
        if (row.nbd) qemuNbd = stopQemuNbd(qemuNbd);
        best.set(tool.name, Math.min(best.get(tool.name) ?? Number.POSITIVE_INFINITY, s));
      }
    }
    for (const [tool, seconds] of best) report.add(row.name, tool, seconds, 's');
  }
} finally {
  qemuNbd?.kill();
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
