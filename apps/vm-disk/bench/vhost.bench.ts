// A real QEMU guest running fio on vhost-user-blk exports: vm-disk against
// qemu-storage-daemon, each given the same command line and a raw image of its own on tmpfs.
// Workloads (libaio, direct=1): 4 KiB random read and random write at QD 32, 256 KiB
// sequential read. Under TCG the guest is the bottleneck, so beside the guest's IOPS
// (MiB/s) the figures that compare the daemons are their CPU time per I/O (utime + stime
// from /proc/PID/stat) and their system calls per I/O (perf's raw_syscalls:sys_enter count,
// when perf can attach), each taken between the guest's start and end markers of a run.
// Ratios are vm-disk's against qsd (above 1: vm-disk better), for the CPU time too.
//
// Both daemons run at once and the one guest has both disks (/dev/vda: qsd, /dev/vdb:
// vm-disk): each round runs every workload on one disk then at once on the other (which
// goes first alternates by round), so that a slow period of a loaded machine falls on
// both servers' runs alike. Each figure is the median of the rounds; the min-max is
// printed beside it. On a 2-CPU machine the daemons run on CPU 0 (`taskset -c 0`) and
// QEMU on CPU 1. A server whose vhost-user-blk export is refused is left out with a message.
// Run with plain node after `nx build vm-disk` (the vm-disk row starts the built bin);
// the guest comes from scripts/guest-image.sh.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { closeFd, eventfdSignal, libc, sysResult } from '@vmdisk/native';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { type GuestRun, hasHardwareKvm, runGuest } from '../test/harness/guest.ts';
import { QSD, type VhostDaemon, type VhostServer, VM_DISK } from '../test/harness/vhost-servers.ts';
import { cpuSeconds, makeImage, PIN, spread } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
// Each workload runs this many times on each disk, interleaved; the median counts.
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 5);
const IMAGE_MIB = Number(process.env.VMDISK_BENCH_GUEST_IMAGE_MIB ?? 256);
const WORKLOADS = [
  { name: '4k-randread', rw: 'randread', bs: 4096 },
  { name: '4k-randwrite', rw: 'randwrite', bs: 4096 },
  { name: '256k-seqread', rw: 'read', bs: 256 * 1024 },
];

// tmpfs, so that the images' own storage is not what is measured.
const dir = mkdtempSync(join('/dev/shm', 'vmdisk-vhost-bench-'));

interface Served {
  server: VhostServer;
  daemon: VhostDaemon;
  socket: string;
  /** The guest's device: vda, vdb in the order the sockets are given to QEMU. */
  dev: string;
}

/**
 * Starts each server on an image of its own (each one's runs start from the same sparse
 * file: the other's writes would leave data where a read of a hole is cheaper on tmpfs).
 * A vm-disk whose vhost-user-blk export is refused is left out.
 */
async function startServers(report: BenchReport): Promise<Served[]> {
  const served: Served[] = [];
  for (const [i, server] of [QSD, VM_DISK].entries()) {
    const image = join(dir, `disk${i}.raw`);
    const socket = join(dir, `vhost${i}.sock`);
    makeImage(image, 'raw', `${IMAGE_MIB}M`);
    try {
      const daemon = await server.start({
        image,
        format: 'raw',
        socket,
        ...(PIN && { cpu: 0 }),
      });
      served.push({ server, daemon, socket, dev: `vd${String.fromCharCode(97 + served.length)}` });
    } catch (e) {
      const why = (e as Error).message.split('\n').find((l) => l.trim() !== '') ?? '';
      if (server === VM_DISK && why.includes("does not accept value 'vhost-user-blk'")) {
        console.log(`vm-disk: skipped, its vhost-user-blk export is refused (${why.trim()})`);
        report.note('vm-disk skipped: its vhost-user-blk export is refused');
      } else {
        for (const s of served) await s.daemon.stop();
        throw e;
      }
    }
  }
  return served;
}

interface Run {
  /** `<dev>:<workload>#<round>`, the markers' name. */
  id: string;
  dev: string;
  round: number;
  workload: (typeof WORKLOADS)[number];
}

function plan(devs: string[]): Run[] {
  const runs: Run[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 === 0 ? devs : [...devs].reverse();
    for (const workload of WORKLOADS) {
      for (const dev of order)
        runs.push({ id: `${dev}:${workload.name}#${round}`, dev, round, workload });
    }
  }
  return runs;
}

// Before the measured runs, each workload once for WARMUP_S on each disk, unmeasured:
// V8 compiles vm-disk's I/O path in the first seconds of I/O (its compiler threads took 9%
// of the daemon's CPU in a first 5 s 4k randread, under 1% in the next), a cost a C
// daemon does not have and a server in service has long paid. Under TCG (about 3000 IOPS)
// 3 s was too short: Turbofan still compiled 33 functions of the path in the 5 s after
// it (14% of the daemon's CPU in a profile), 6 after a 6 s warm-up.
const WARMUP_S = Number(process.env.VMDISK_BENCH_WARMUP ?? 6);

// Each run between markers the host sees on the serial console; fio's terse output
// (version 3) on the end marker: field 6 is read KiB, 8 read IOPS, 47 write KiB, 49 write IOPS.
// A run that stalls (a request never completed) is cut short by `timeout`, and the
// device's in-flight counts are printed instead of figures.
function script(devs: string[], runs: Run[]): string {
  const warmup =
    WARMUP_S > 0
      ? devs.flatMap((dev) =>
          WORKLOADS.map(
            (w) => `fio --name=warmup --filename=/dev/${dev} --ioengine=libaio --direct=1 \\
  --rw=${w.rw} --bs=${w.bs} --iodepth=32 --runtime=${WARMUP_S} --time_based >/dev/null`,
          ),
        )
      : [];
  return [
    ...warmup,
    ...runs.map(
      (r) => `echo "VMDISK-BENCH-START ${r.id}"
out=$(timeout ${RUNTIME_S + 60} fio --name=bench --filename=/dev/${r.dev} --ioengine=libaio \\
  --direct=1 --rw=${r.workload.rw} --bs=${r.workload.bs} --iodepth=32 --runtime=${RUNTIME_S} \\
  --time_based --output-format=terse) || echo "VMDISK-BENCH-STALLED ${r.id} inflight $(cat /sys/block/${r.dev}/inflight)"
echo "VMDISK-BENCH-END ${r.id} $out"`,
    ),
  ].join('\n');
}

/**
 * Nanoseconds each of the daemon's threads waited runnable for a CPU
 * (/proc/PID/task/TID/schedstat, second field), kept per thread: a thread that ends (a
 * worker of io_uring or of libuv's pool) takes its figure with it, so a sum over the
 * threads alive at each end of a run can fall (it went negative). Sampled while a run is
 * on, and at its ends; a run's wait is the growth of each thread's last figure.
 */
class RunqueueWait {
  private readonly last = new Map<string, number>();
  private readonly pid: number;

  constructor(pid: number) {
    this.pid = pid;
  }

  sample(): void {
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${this.pid}/task`);
    } catch {
      return; // the daemon ended
    }
    for (const tid of tids) {
      try {
        const ns = Number(
          readFileSync(`/proc/${this.pid}/task/${tid}/schedstat`, 'utf8').split(' ')[1],
        );
        this.last.set(tid, ns);
      } catch {
        // The thread ended meanwhile: its last sample stands.
      }
    }
  }

  /** A fresh sample: the figure of every thread seen so far. */
  snapshot(): Map<string, number> {
    this.sample();
    return new Map(this.last);
  }

  /** Seconds waited since `from` (threads born after it count from zero). */
  since(from: Map<string, number>): number {
    this.sample();
    let ns = 0;
    for (const [tid, v] of this.last) ns += v - (from.get(tid) ?? 0);
    return ns / 1e9;
  }
}

/**
 * perf stat counting the daemon's system calls (all its threads, and those they start)
 * until stopped; undefined where perf cannot attach (not installed, not permitted).
 */
function countSyscalls(pid: number): { stop(): Promise<number | undefined> } {
  let child: ChildProcess | undefined;
  let err = '';
  try {
    child = spawn('perf', ['stat', '-x,', '-e', 'raw_syscalls:sys_enter', '-p', String(pid)], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    child.on('error', () => {});
    child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      err += d;
    });
  } catch {
    child = undefined;
  }
  return {
    stop: async () => {
      if (child === undefined || child.pid === undefined) return undefined;
      const c = child;
      const exited = new Promise<void>((resolve) => {
        if (c.exitCode !== null || c.signalCode !== null) resolve();
        else c.on('exit', () => resolve());
      });
      c.kill('SIGINT');
      await exited;
      const line = err.split('\n').find((l) => l.includes('raw_syscalls:sys_enter'));
      const n = Number(line?.split(',')[0]);
      return Number.isFinite(n) ? n : undefined;
    },
  };
}

const syscallFn = libc.func('long syscall(long nr, ...)');
const SYS_PIDFD_OPEN = 434;
const SYS_PIDFD_GETFD = 438;

/**
 * Signals every eventfd of the daemon (pidfd_getfd: a copy of each, written once). For a
 * run that stalled: under load qemu-storage-daemon 7.2 here lost a notification (it slept
 * in poll, every eventfd at 0, while the guest waited on its requests and fio could not
 * even exit), and the whole bench hung. Spurious kicks and interrupts are allowed by
 * virtio, as are spurious wake-ups of the daemon's own event loops. Returns the count
 * signalled.
 */
function nudge(pid: number): number {
  const pidfd = sysResult(syscallFn(SYS_PIDFD_OPEN, 'int', pid, 'uint', 0));
  if (pidfd < 0) return 0;
  let n = 0;
  try {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== 'anon_inode:[eventfd]') continue;
      } catch {
        continue;
      }
      const copy = sysResult(
        syscallFn(SYS_PIDFD_GETFD, 'int', pidfd, 'int', Number(fd), 'uint', 0),
      );
      if (copy < 0) continue;
      if (eventfdSignal(copy) === 8) n++;
      closeFd(copy);
    }
  } finally {
    closeFd(pidfd);
  }
  return n;
}

/** A run not ended this long after its start has stalled (fio stops at RUNTIME_S). */
const STALL_MS = (RUNTIME_S + 30) * 1000;

// VMDISK_BENCH_SYSCALLS=0 leaves perf out: its count costs a little in each system call, so
// more in qsd's runs (about 4x vm-disk's calls per I/O) than in ours.
const PERF =
  process.env.VMDISK_BENCH_SYSCALLS !== '0' && spawnSync('perf', ['--version']).status === 0;

interface Sample {
  /** IOPS for 4 KiB workloads, MiB/s for the sequential one. */
  rate: number;
  /** Daemon CPU microseconds per I/O. */
  cpuUsPerIo: number;
  /** Daemon system calls per I/O (perf), when counted. */
  syscallsPerIo: number | undefined;
}

async function measure(served: Served[]): Promise<Map<string, Map<string, Sample[]>>> {
  const byDev = new Map(served.map((s) => [s.dev, s]));
  const runs = plan(served.map((s) => s.dev));
  const waits = new Map(served.map((s) => [s.dev, new RunqueueWait(s.daemon.pid)]));
  const open = new Map<
    string,
    {
      cpu: number;
      wait: Map<string, number>;
      syscalls: ReturnType<typeof countSyscalls> | undefined;
      watchdog: NodeJS.Timeout;
    }
  >();
  // Runs whose daemon was nudged: their figures are left out.
  const nudged = new Set<string>();
  const ends = new Map<
    string,
    { cpu: number; wait: number; syscalls: Promise<number | undefined>; terse: string }
  >();
  // While a run is on, its daemon's threads are sampled (see RunqueueWait).
  const sampler = setInterval(() => {
    for (const id of open.keys()) waits.get(id.split(':')[0]!)?.sample();
  }, 200);
  let guest: GuestRun;
  try {
    guest = await runGuest({
      vhostSocket: served[0]!.socket,
      moreVhostSockets: served.slice(1).map((s) => s.socket),
      script: script(
        served.map((s) => s.dev),
        runs,
      ),
      fio: true,
      timeoutMs:
        300_000 + (runs.length * RUNTIME_S + served.length * WORKLOADS.length * WARMUP_S) * 4000,
      ...(PIN && { cpuAffinity: 1 }),
      onLine: (line) => {
        const [marker, id = '', terse = ''] = line.split(' ');
        const s = byDev.get(id.split(':')[0]!);
        if (s === undefined) return;
        if (marker === 'VMDISK-BENCH-START') {
          open.set(id, {
            cpu: cpuSeconds(s.daemon.pid),
            wait: waits.get(s.dev)!.snapshot(),
            syscalls: PERF ? countSyscalls(s.daemon.pid) : undefined,
            watchdog: setTimeout(() => {
              nudged.add(id);
              const n = nudge(s.daemon.pid);
              console.log(`${s.server.name} ${id}: stalled, its ${n} eventfds signalled`);
            }, STALL_MS),
          });
        }
        const start = open.get(id);
        if (marker === 'VMDISK-BENCH-END' && start !== undefined) {
          open.delete(id);
          clearTimeout(start.watchdog);
          ends.set(id, {
            cpu: cpuSeconds(s.daemon.pid) - start.cpu,
            wait: waits.get(s.dev)!.since(start.wait),
            syscalls: start.syscalls?.stop() ?? Promise.resolve(undefined),
            terse,
          });
        }
      },
    });
  } finally {
    clearInterval(sampler);
    for (const o of open.values()) {
      clearTimeout(o.watchdog);
      await o.syscalls?.stop();
    }
  }
  const samples = new Map<string, Map<string, Sample[]>>();
  for (const r of runs) {
    const name = byDev.get(r.dev)!.server.name;
    const end = ends.get(r.id);
    const f = end?.terse.split(';') ?? [];
    if (nudged.has(r.id)) {
      console.log(`${name} ${r.id}: left out (stalled, its daemon was nudged)`);
      continue;
    }
    if (end === undefined || f.length < 50) {
      const stalled = guest.log
        .split('\n')
        .find((l) => l.startsWith(`VMDISK-BENCH-STALLED ${r.id}`));
      console.log(`${name} ${r.id}: no figures (${stalled ?? 'fio failed'})`);
      continue;
    }
    const w = r.workload;
    const write = w.rw.includes('write');
    const kib = Number(f[write ? 46 : 5]);
    const ios = (kib * 1024) / w.bs;
    const rate = w.bs === 4096 ? Number(f[write ? 48 : 7]) : kib / 1024 / RUNTIME_S;
    const syscalls = await end.syscalls;
    const sample: Sample = {
      rate,
      cpuUsPerIo: (end.cpu * 1e6) / ios,
      syscallsPerIo: syscalls === undefined ? undefined : syscalls / ios,
    };
    console.log(
      `${name} ${r.id}: ${rate.toFixed(0)} ${w.bs === 4096 ? 'IOPS' : 'MiB/s'}, daemon CPU ${sample.cpuUsPerIo.toFixed(1)} µs/IO${
        sample.syscallsPerIo === undefined ? '' : `, ${sample.syscallsPerIo.toFixed(2)} syscalls/IO`
      }, waited for a CPU ${((end.wait * 1e6) / ios).toFixed(1)} µs/IO (${((100 * end.wait) / RUNTIME_S).toFixed(0)}% of the run)`,
    );
    const of = samples.get(w.name) ?? new Map<string, Sample[]>();
    samples.set(w.name, of);
    of.set(name, [...(of.get(name) ?? []), sample]);
  }
  console.log(
    `guest booted in ${(guest.bootMs / 1000).toFixed(1)} s, ran ${(guest.totalMs / 1000).toFixed(1)} s`,
  );
  return samples;
}

const report = new BenchReport('vhost');
let results = new Map<string, Map<string, Sample[]>>();
try {
  report.note(
    `guest: ${hasHardwareKvm() ? 'KVM' : 'TCG (no hardware KVM)'}; ${
      PIN ? 'daemons on CPU 0, QEMU on CPU 1' : 'unpinned (nproc is not 2)'
    }; ${RUNTIME_S} s per run after a ${WARMUP_S} s warm-up of each workload, median of ${ROUNDS} rounds (the servers' runs interleaved in one guest), ${IMAGE_MIB} MiB raw image each on tmpfs`,
  );
  const served = await startServers(report);
  try {
    results = await measure(served);
  } finally {
    for (const s of served) await s.daemon.stop();
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

// The guest's rates first, then the daemons' CPU time and system calls per I/O for the
// same runs: each the median of the rounds, its min-max printed beside it.
const figures: {
  label: (w: string) => string;
  unit: (bs: number) => string;
  of: (s: Sample) => number | undefined;
}[] = [
  { label: (w) => w, unit: (bs) => (bs === 4096 ? 'IOPS' : 'MiB/s'), of: (s) => s.rate },
  { label: (w) => `${w}: daemon CPU`, unit: () => 'µs/IO', of: (s) => s.cpuUsPerIo },
  { label: (w) => `${w}: daemon syscalls`, unit: () => 'syscalls/IO', of: (s) => s.syscallsPerIo },
];
console.log('\nmedian (min-max) of the rounds:');
for (const fig of figures) {
  for (const w of WORKLOADS) {
    for (const [server, samples] of results.get(w.name) ?? []) {
      const xs = samples.map(fig.of).filter((x): x is number => x !== undefined);
      if (xs.length === 0) continue;
      const { median, min, max } = spread(xs);
      const unit = fig.unit(w.bs);
      const digits = median >= 100 ? 0 : median >= 10 ? 1 : 2;
      console.log(
        `  ${fig.label(w.name)} ${server}: ${median.toFixed(digits)} ${unit} (${min.toFixed(digits)}-${max.toFixed(digits)}, ${xs.length} rounds)`,
      );
      report.add(
        fig.label(w.name),
        server,
        median,
        unit,
        unit === 'syscalls/IO' ? 'lower' : undefined,
      );
    }
  }
}
report.flush();
