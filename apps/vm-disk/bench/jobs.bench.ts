// Block-job throughput: `vm-disk serve` against qemu-storage-daemon given the same command
// line and the same QMP, on images in tmpfs (/dev/shm):
// - mirror: blockdev-mirror sync=full of a fully allocated qcow2 to a new qcow2 / raw node
//   (blockdev-add), timed from the command to BLOCK_JOB_READY, then cancelled;
// - stream: block-stream of a 2-layer chain (a fully allocated base under an empty overlay),
//   timed from the command to BLOCK_JOB_COMPLETED.
// Each again under a concurrent fio 4 KiB random-write load (iodepth 32, nbd engine) on the
// daemon's NBD export of the disk (the mirror's source, the stream's top), over its first
// eighth (steady after the 3 s warm-up; elsewhere the job has its work to do). Under load the
// mirror runs with copy-mode=write-blocking and granularity=4096: in background mode a
// random-write load keeps dirtying the bitmap, and a write that covers no whole granule
// leaves its granule dirty (QEMU 7.2 do_sync_target_write), so the job need never converge. fio logs its IOPS every 100 ms with
// Unix timestamps; the export's IOPS while the job runs are divided by its IOPS in the
// 3 s before the job started (less fio's first half second).
// Under load our jobs give way to the export's requests (block-graph give-way.ts) where
// qemu-storage-daemon's take what they can: the MiB/s under load and the IOPS kept are the
// two ends of one trade, the CPU being one. MiB/s of each daemon and ours over theirs (above
// 1: we are faster); daemons take turns, each figure the best of 2 rounds. Beside it, the
// daemon's CPU time over the job (user + system, all its threads, /proc/PID/stat), as MiB
// per CPU second: pinned to one CPU the job is CPU-bound, so this is the figure that
// another process on the machine disturbs least. Size: VMDISK_BENCH_JOBS_MIB (default
// 1024). On a 2-CPU machine each daemon runs pinned to CPU 0 and fio to CPU 1, as in
// serve.bench.ts.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import {
  cpuSeconds,
  type DaemonName,
  iopsKept,
  PIN,
  sh,
  startDaemon,
  startFioLoad,
  waitForSocket,
} from './support.ts';

const MIB = Number(process.env.VMDISK_BENCH_JOBS_MIB ?? 1024);
const SIZE = `${MIB}M`;
/** How long fio runs before the job starts: the IOPS baseline. */
const BASELINE_MS = 3000;
const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'vmdisk-jobs-bench-'));

type Msg = Record<string, unknown>;

/** A QMP connection: requests in turn, events kept until looked for. */
class Qmp {
  #socket: net.Socket;
  #buf = '';
  #messages: Msg[] = [];
  #wake: (() => void) | undefined;

  constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8').on('data', (d: string) => {
      this.#buf += d;
      for (let nl = this.#buf.indexOf('\n'); nl >= 0; nl = this.#buf.indexOf('\n')) {
        const line = this.#buf.slice(0, nl).trim();
        this.#buf = this.#buf.slice(nl + 1);
        if (line) this.#messages.push(JSON.parse(line) as Msg);
      }
      this.#wake?.();
    });
  }

  static async connect(path: string): Promise<Qmp> {
    const socket = net.connect(path);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const qmp = new Qmp(socket);
    await qmp.#take((m) => 'QMP' in m);
    await qmp.run('qmp_capabilities');
    return qmp;
  }

  async #take(match: (m: Msg) => boolean): Promise<Msg> {
    for (;;) {
      const i = this.#messages.findIndex(match);
      if (i >= 0) return this.#messages.splice(i, 1)[0] as Msg;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
  }

  async run(execute: string, args?: Msg): Promise<Msg> {
    this.#socket.write(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
    const reply = await this.#take((m) => 'return' in m || 'error' in m);
    if ('error' in reply) throw new Error(`${execute}: ${JSON.stringify(reply.error)}`);
    return reply;
  }

  event(name: string): Promise<Msg> {
    return this.#take((m) => m.event === name);
  }

  close(): void {
    this.#socket.destroy();
  }
}

const DAEMONS: DaemonName[] = ['vm-disk', 'qemu-storage-daemon'];

interface Case {
  name: string;
  /** Makes the images; returns the daemon's arguments after the monitor's and NBD's. */
  setup(): string[];
  /** Starts the job and resolves when its copying is done. */
  job(qmp: Qmp, load: boolean): Promise<void>;
}

const base = join(dir, 'base.qcow2');
const top = join(dir, 'top.qcow2');
const target = (fmt: string) => join(dir, `target.${fmt}`);
const exportOf = (node: string) => [
  '--export',
  `type=nbd,id=e0,node-name=${node},name=disk,writable=on`,
];

const mirrorCase = (fmt: string): Case => ({
  name: `mirror -> ${fmt}`,
  setup: () => {
    rmSync(target(fmt), { force: true });
    sh('qemu-img', ['create', '-q', '-f', fmt, target(fmt), SIZE]);
    return [
      '--blockdev',
      `driver=file,node-name=f0,filename=${base}`,
      '--blockdev',
      'driver=qcow2,node-name=d0,file=f0',
      ...exportOf('d0'),
    ];
  },
  job: async (qmp, load) => {
    await qmp.run('blockdev-add', {
      driver: fmt,
      'node-name': 't0',
      file: { driver: 'file', filename: target(fmt) },
    });
    await qmp.run('blockdev-mirror', {
      'job-id': 'j0',
      device: 'd0',
      target: 't0',
      sync: 'full',
      ...(load && { 'copy-mode': 'write-blocking', granularity: 4096 }),
    });
    await qmp.event('BLOCK_JOB_READY');
  },
});

const streamCase: Case = {
  name: 'stream',
  setup: () => {
    rmSync(top, { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    return [
      '--blockdev',
      `driver=file,node-name=f1,filename=${top}`,
      '--blockdev',
      'driver=qcow2,node-name=d1,file=f1',
      ...exportOf('d1'),
    ];
  },
  job: async (qmp) => {
    await qmp.run('block-stream', { 'job-id': 'j0', device: 'd1' });
    // A job that failed completes too, with an error: its time is no throughput.
    const done = await qmp.event('BLOCK_JOB_COMPLETED');
    const error = (done.data as { error?: string } | undefined)?.error;
    if (error !== undefined) throw new Error(`block-stream failed: ${error}`);
  },
};

const CASES = [mirrorCase('qcow2'), mirrorCase('raw'), streamCase];

/** What one job on one daemon did: MiB/s, MiB per CPU second, the export's IOPS kept. */
interface Measured {
  mibs: number;
  cpuMibs: number;
  /** Under load: the export's IOPS while the job ran over before it (fraction). */
  kept?: number;
}

async function measure(daemon: DaemonName, c: Case, load: boolean): Promise<Measured> {
  const qmpPath = join(dir, 'qmp.sock');
  const nbdPath = join(dir, 'nbd.sock');
  rmSync(qmpPath, { force: true });
  rmSync(nbdPath, { force: true });
  const child = startDaemon(daemon, [
    '--chardev',
    `socket,id=m0,path=${qmpPath},server=on,wait=off`,
    '--monitor',
    'chardev=m0',
    '--nbd-server',
    `addr.type=unix,addr.path=${nbdPath}`,
    ...c.setup(),
  ]);
  const exited = new Promise((r) => child.once('exit', r));
  let qmp: Qmp | undefined;
  try {
    await waitForSocket(qmpPath, child);
    await waitForSocket(nbdPath, child);
    qmp = await Qmp.connect(qmpPath);
    // The first eighth only: in a few seconds 4 KiB writes all over the disk would allocate
    // every cluster of the stream's top, leaving the job nothing to copy.
    const size = `${Math.max(1, MIB >> 3)}M`;
    const fio = load
      ? startFioLoad(nbdPath, { prefix: join(dir, 'fio'), iodepth: 32, size })
      : undefined;
    if (fio) await new Promise((r) => setTimeout(r, BASELINE_MS));
    const pid = child.pid as number;
    const cpu0 = cpuSeconds(pid);
    const t0 = Date.now();
    await c.job(qmp, load);
    const t1 = Date.now();
    const cpuMibs = MIB / (cpuSeconds(pid) - cpu0);
    const mibs = MIB / ((t1 - t0) / 1000);
    if (!fio) return { mibs, cpuMibs };
    const kept = iopsKept(await fio.stop(), t0, t1);
    return { mibs, cpuMibs, ...(kept !== undefined && { kept }) };
  } finally {
    qmp?.close();
    child.kill('SIGKILL');
    await exited;
  }
}

const report = new BenchReport('jobs');
report.note(`${MIB} MiB images on tmpfs; each figure the best of 2 rounds`);
try {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', base, SIZE]);
  sh('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${SIZE}`, base]);
  console.log(`${MIB} MiB images in ${dir}; ${PIN ? 'daemons on CPU 0, fio on CPU 1' : ''}`);
  for (const load of [false, true]) {
    for (const c of CASES) {
      // The best of each figure over the rounds, each on its own: under load the MiB/s and
      // the IOPS kept are the two ends of one trade, and the round with the best of one
      // would otherwise bring the other's worst.
      const best = new Map<string, Measured>();
      for (let round = 0; round < 2; round++) {
        for (const d of DAEMONS) {
          const r = await measure(d, c, load);
          // A load that never ran (fio starved of CPU 1 by other work): not a loaded figure.
          if (load && r.kept === undefined) continue;
          const b = best.get(d);
          best.set(d, {
            mibs: Math.max(b?.mibs ?? 0, r.mibs),
            cpuMibs: Math.max(b?.cpuMibs ?? 0, r.cpuMibs),
            ...(r.kept !== undefined && { kept: Math.max(b?.kept ?? 0, r.kept) }),
          });
        }
      }
      const workload = `${c.name}${load ? ' + fio 4k randwrite' : ''}`;
      for (const [daemon, r] of best) {
        report.add(workload, daemon, r.mibs, 'MiB/s');
        report.add(`${workload}: CPU`, daemon, r.cpuMibs, 'MiB/CPU-s');
        if (r.kept !== undefined)
          report.add(`${workload}: export IOPS kept`, daemon, r.kept * 100, '%');
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
