// Backup jobs: `vm-disk serve` against qemu-storage-daemon with the same QMP, on a 1 GiB
// qcow2 image full of data on tmpfs (/dev/shm): a full backup (blockdev-backup sync=full
// into an empty qcow2), then, with a dirty bitmap added before it and 10% of the disk
// written through the NBD export afterwards (64 KiB every 640 KiB), an incremental one
// (sync=incremental into another empty qcow2). Time from the command to the job's end;
// MiB/s of the disk (full) and of the dirty data (incremental), and our speed over theirs
// (above 1: we are faster). Then the guest's I/O while a full backup runs: fio 4 KiB random
// writes at iodepth 8 on the export (its IOPS logged every 100 ms), 3 s alone, then during
// the backup; the IOPS kept is the second over the first (each copy-before-write copies a
// cluster before the guest's write goes on). On 2 CPUs the daemon runs on CPU 0, fio on 1.
// Run with plain node after `nx build vm-disk`.
// VMDISK_BENCH_BACKUP_MIB sets the size (default 1024).
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { type DaemonName, iopsKept, sh, startDaemon, startFioLoad } from './support.ts';

const MIB = Number(process.env.VMDISK_BENCH_BACKUP_MIB ?? 1024);
const SIZE = MIB << 20;
const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const dir = mkdtempSync(join(base, 'vmdisk-backup-bench-'));
const p = (name: string): string => join(dir, name);

/** How long fio runs alone before the backup starts: the IOPS baseline. */
const BASELINE_MS = 3000;

/** A line-JSON QMP client: commands in turn, events kept for `until`. */
class Qmp {
  readonly #sock: Socket;
  #buf = '';
  #lines: Record<string, unknown>[] = [];
  #wake: (() => void) | undefined;

  private constructor(sock: Socket) {
    this.#sock = sock;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.#buf += d;
      for (let i = this.#buf.indexOf('\n'); i >= 0; i = this.#buf.indexOf('\n')) {
        const line = this.#buf.slice(0, i).trim();
        this.#buf = this.#buf.slice(i + 1);
        if (line) this.#lines.push(JSON.parse(line) as Record<string, unknown>);
      }
      this.#wake?.();
    });
  }

  static async open(path: string): Promise<Qmp> {
    for (let i = 0; ; i++) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path, () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        await q.#next((m) => 'QMP' in m);
        await q.cmd('qmp_capabilities');
        return q;
      } catch (err) {
        if (i > 100) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  async #next(match: (m: Record<string, unknown>) => boolean): Promise<Record<string, unknown>> {
    for (;;) {
      const i = this.#lines.findIndex(match);
      if (i >= 0) return this.#lines.splice(i, 1)[0]!;
      await new Promise<void>((r) => {
        this.#wake = r;
      });
    }
  }

  async cmd(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    this.#sock.write(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
    const m = await this.#next((l) => 'return' in l || 'error' in l);
    if ('error' in m) throw new Error(`${execute}: ${JSON.stringify(m.error)}`);
    return m.return;
  }

  /** Waits for the job's JOB_STATUS_CHANGE to `status` (seen already or to come). */
  until(id: string, status: string): Promise<unknown> {
    return this.#next((m) => {
      const d = m.data as { id?: string; status?: string } | undefined;
      return m.event === 'JOB_STATUS_CHANGE' && d?.id === id && d.status === status;
    });
  }

  close(): void {
    this.#sock.end();
  }
}

interface Figures {
  full: number;
  incremental: number;
}

/** Seconds of one backup job: from the command to its end (status null). */
async function backup(q: Qmp, id: string, args: Record<string, unknown>): Promise<number> {
  const start = process.hrtime.bigint();
  await q.cmd('blockdev-backup', { 'job-id': id, device: 'src', ...args });
  await q.until(id, 'null');
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/**
 * The daemon's command line: a QMP monitor on `qmp`, a qcow2 node over `<name>.qcow2` for each
 * of `nodes`, and node `src` exported as `disk` on `sock`.
 */
function backupArgs(qmp: string, sock: string, nodes: string[]): string[] {
  return [
    '--chardev',
    `socket,id=m0,path=${qmp},server=on,wait=off`,
    '--monitor',
    'chardev=m0',
    ...nodes.flatMap((name) => [
      '--blockdev',
      `driver=qcow2,node-name=${name},file.driver=file,file.filename=${p(`${name}.qcow2`)}`,
    ]),
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}`,
    '--export',
    'type=nbd,id=e0,node-name=src,name=disk,writable=on',
  ];
}

/** Empty qcow2 targets of SIZE, and src.qcow2 a fresh copy of the source. */
function freshImages(targets: string[]): void {
  for (const f of targets) {
    rmSync(p(f), { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p(f), String(SIZE)]);
  }
  sh('cp', ['--sparse=always', p('orig.qcow2'), p('src.qcow2')]);
}

async function runOne(tool: DaemonName): Promise<Figures> {
  freshImages(['full.qcow2', 'inc.qcow2']);
  const qmp = p(`${tool}.qmp`);
  const sock = p(`${tool}.nbd`);
  const child = startDaemon(tool, backupArgs(qmp, sock, ['src', 'full', 'inc']));
  try {
    const q = await Qmp.open(qmp);
    await q.cmd('block-dirty-bitmap-add', { node: 'src', name: 'b0' });
    const full = await backup(q, 'f', { target: 'full', sync: 'full' });
    // 10% of the disk dirty: 64 KiB every 640 KiB, through the export.
    const cmds: string[] = [];
    for (let at = 0; at < SIZE; at += 640 << 10) cmds.push('-c', `write -P 0x5a ${at} 64k`);
    sh('qemu-io', ['-f', 'raw', ...cmds, `nbd+unix:///disk?socket=${sock}`]);
    const incremental = await backup(q, 'i', {
      target: 'inc',
      sync: 'incremental',
      bitmap: 'b0',
    });
    await q.cmd('quit');
    q.close();
    return { full, incremental };
  } finally {
    await stopped(child);
  }
}

function stopped(child: ChildProcess): Promise<void> {
  return new Promise<void>((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once('exit', () => resolve());
    setTimeout(() => child.kill('SIGKILL'), 30_000).unref();
  });
}

/** The fraction of the guest's IOPS kept while a full backup runs. */
async function ioDuringBackup(tool: DaemonName): Promise<number> {
  freshImages(['full.qcow2']);
  const qmp = p(`${tool}-io.qmp`);
  const sock = p(`${tool}-io.nbd`);
  const child = startDaemon(tool, backupArgs(qmp, sock, ['src', 'full']));
  try {
    const q = await Qmp.open(qmp);
    const fio = startFioLoad(sock, { prefix: p('fio'), iodepth: 8 });
    await new Promise((r) => setTimeout(r, BASELINE_MS));
    const t0 = Date.now();
    await backup(q, 'f', { target: 'full', sync: 'full' });
    const t1 = Date.now();
    const log = await fio.stop();
    await q.cmd('quit');
    q.close();
    return iopsKept(log, t0, t1) ?? 0;
  } finally {
    await stopped(child);
  }
}

try {
  // The source: all data (qemu-io fills it), converted once, copied before each run.
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('orig.qcow2'), String(SIZE)]);
  sh('qemu-io', ['-c', `write -P 0x11 0 ${SIZE}`, p('orig.qcow2')]);
  console.log(`source: ${MIB} MiB qcow2, all data, in ${dir}`);
  const best = new Map<string, Figures>();
  // Which daemon goes first alternates by round.
  const order = (round: number) =>
    round % 2 === 0
      ? (['vm-disk', 'qemu-storage-daemon'] as const)
      : (['qemu-storage-daemon', 'vm-disk'] as const);
  for (let round = 0; round < 2; round++) {
    for (const tool of order(round)) {
      const f = await runOne(tool);
      const b = best.get(tool);
      best.set(tool, {
        full: Math.min(b?.full ?? Number.POSITIVE_INFINITY, f.full),
        incremental: Math.min(b?.incremental ?? Number.POSITIVE_INFINITY, f.incremental),
      });
    }
  }
  const dirty = MIB / 10;
  const kept = new Map<string, number>();
  const report = new BenchReport('backup');
  report.note(
    `source: ${MIB} MiB qcow2 on tmpfs, all data; best of 2, which daemon goes first alternating`,
  );
  for (const [name, f] of best) {
    report.add(`full, ${MIB} MiB`, name, MIB / f.full, 'MiB/s');
    report.add('incremental, 10% dirty', name, dirty / f.incremental, 'MiB/s');
  }
  for (let round = 0; round < 2; round++) {
    for (const tool of order(round)) {
      kept.set(tool, Math.max(kept.get(tool) ?? 0, await ioDuringBackup(tool)));
    }
  }
  report.note(
    'guest: fio 4k randwrite QD8 on the export during a full backup, IOPS kept vs without',
  );
  for (const [name, k] of kept)
    report.add('guest IOPS kept during a full backup', name, k * 100, '%');
  report.flush();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
