// A real QEMU guest running fio on a vhost-user-blk export: vm-disk against
// qemu-storage-daemon, each given the same command line and the same raw image on tmpfs.
// Workloads (libaio, direct=1): 4 KiB random read and random write at QD 32, 256 KiB
// sequential read. Under TCG the guest is the bottleneck, so beside the guest's IOPS
// (MiB/s) the figure that compares the daemons is their CPU time per I/O: utime + stime
// from /proc/PID/stat between the guest's start and end markers of each workload. Ratios
// are vm-disk's against qsd (above 1: vm-disk better), for the CPU time too.
// On a 2-CPU machine the daemon runs on CPU 0 (`taskset -c 0`) and QEMU on CPU 1.
// A server whose vhost-user-blk export is refused is skipped with a message.
// Run with plain node after `nx build vm-disk` (the vm-disk row starts the built bin);
// the guest comes from scripts/guest-image.sh.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import { type GuestRun, hasHardwareKvm, runGuest } from '../test/harness/guest.ts';
import { QSD, type VhostServer, VM_DISK } from '../test/harness/vhost-servers.ts';
import { cpuSeconds, makeImage, PIN } from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
// Each workload runs this many times in the guest (one boot per server); the best counts.
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const IMAGE_MIB = Number(process.env.VMDISK_BENCH_GUEST_IMAGE_MIB ?? 256);
const SERVERS: VhostServer[] = [QSD, VM_DISK];
const WORKLOADS = [
  { name: '4k-randread', rw: 'randread', bs: 4096 },
  { name: '4k-randwrite', rw: 'randwrite', bs: 4096 },
  { name: '256k-seqread', rw: 'read', bs: 256 * 1024 },
];

// tmpfs, so that the image's own storage is not what is measured.
const dir = mkdtempSync(join('/dev/shm', 'vmdisk-vhost-bench-'));

// Each workload between markers the host sees on the serial console; fio's terse output
// (version 3) on the end marker: field 6 is read KiB, 8 read IOPS, 47 write KiB, 49 write IOPS.
// A workload that stalls (a request never completed) is cut short by `timeout`, and the
// device's in-flight counts are printed instead of figures.
const RUNS = Array.from({ length: ROUNDS }, (_, round) =>
  WORKLOADS.map((w) => ({ ...w, run: `${w.name}#${round}` })),
).flat();
// Before the measured runs, each workload once for WARMUP_S, unmeasured, on both servers:
// V8 compiles vm-disk's I/O path in the first seconds of I/O (its compiler threads took 9%
// of the daemon's CPU in a first 5 s 4k randread, under 1% in the next), a cost a C
// daemon does not have and a server in service has long paid.
const WARMUP_S = Number(process.env.VMDISK_BENCH_WARMUP ?? 3);
const WARMUP =
  WARMUP_S > 0
    ? WORKLOADS.map(
        (w) => `fio --name=warmup --filename=/dev/vda --ioengine=libaio --direct=1 \\
  --rw=${w.rw} --bs=${w.bs} --iodepth=32 --runtime=${WARMUP_S} --time_based >/dev/null`,
      )
    : [];
const SCRIPT = [
  ...WARMUP,
  ...RUNS.map(
    (w) => `echo "VMDISK-BENCH-START ${w.run}"
out=$(timeout ${RUNTIME_S + 60} fio --name=bench --filename=/dev/vda --ioengine=libaio \\
  --direct=1 --rw=${w.rw} --bs=${w.bs} --iodepth=32 --runtime=${RUNTIME_S} --time_based \\
  --output-format=terse) || echo "VMDISK-BENCH-STALLED ${w.run} inflight $(cat /sys/block/vda/inflight)"
echo "VMDISK-BENCH-END ${w.run} $out"`,
  ),
].join('\n');

/**
 * Seconds the daemon's threads waited runnable for a CPU (/proc/PID/task/TID/schedstat,
 * second field). On a shared machine this is what moves the guest's IOPS most: the
 * guest waits on a daemon that waits for CPU 0, so a run whose daemon waited far more
 * than the other's compares the machine's load, not the daemons.
 */
function runqueueWaitSeconds(pid: number): number {
  let ns = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[1]);
    } catch {
      // The thread ended meanwhile.
    }
  }
  return ns / 1e9;
}

interface Figure {
  /** IOPS for 4 KiB workloads, MiB/s for the sequential one. */
  rate: number;
  /** Daemon CPU microseconds per I/O. */
  cpuUsPerIo: number;
}

async function measure(server: VhostServer, image: string): Promise<Map<string, Figure>> {
  const socket = join(dir, 'vhost.sock');
  rmSync(socket, { force: true });
  const daemon = await server.start({
    image,
    format: 'raw',
    socket,
    ...(PIN && { cpu: 0 }),
  });
  // CPU seconds the daemon used during each workload, and fio's line for it.
  const cpuAtStart = new Map<string, number>();
  const waitAtStart = new Map<string, number>();
  const ends = new Map<string, { cpu: number; wait: number; terse: string }>();
  let run: GuestRun;
  try {
    run = await runGuest({
      vhostSocket: socket,
      script: SCRIPT,
      fio: true,
      timeoutMs: 300_000 + (RUNS.length * RUNTIME_S + WARMUP.length * WARMUP_S) * 4000,
      ...(PIN && { cpuAffinity: 1 }),
      onLine: (line) => {
        const [marker, name = '', terse = ''] = line.split(' ');
        if (marker === 'VMDISK-BENCH-START') {
          cpuAtStart.set(name, cpuSeconds(daemon.pid));
          waitAtStart.set(name, runqueueWaitSeconds(daemon.pid));
        }
        if (marker === 'VMDISK-BENCH-END') {
          ends.set(name, {
            cpu: cpuSeconds(daemon.pid) - (cpuAtStart.get(name) ?? 0),
            wait: runqueueWaitSeconds(daemon.pid) - (waitAtStart.get(name) ?? 0),
            terse,
          });
        }
      },
    });
  } finally {
    await daemon.stop();
  }
  const figures = new Map<string, Figure>();
  for (const w of RUNS) {
    const end = ends.get(w.run);
    const f = end?.terse.split(';') ?? [];
    if (end === undefined || f.length < 50) {
      const stalled = run.log
        .split('\n')
        .find((l) => l.startsWith(`VMDISK-BENCH-STALLED ${w.run}`));
      console.log(`${server.name} ${w.run}: no figures (${stalled ?? 'fio failed'})`);
      continue;
    }
    const write = w.rw.includes('write');
    const kib = Number(f[write ? 46 : 5]);
    const ios = (kib * 1024) / w.bs;
    const rate = w.bs === 4096 ? Number(f[write ? 48 : 7]) : kib / 1024 / RUNTIME_S;
    console.log(
      `${server.name} ${w.run}: ${rate.toFixed(0)} ${w.bs === 4096 ? 'IOPS' : 'MiB/s'}, daemon CPU ${((end.cpu * 1e6) / ios).toFixed(1)} µs/IO, waited for a CPU ${((end.wait * 1e6) / ios).toFixed(1)} µs/IO (${((100 * end.wait) / RUNTIME_S).toFixed(0)}% of the run)`,
    );
    const best = figures.get(w.name);
    if (best === undefined || rate > best.rate) {
      figures.set(w.name, { rate, cpuUsPerIo: (end.cpu * 1e6) / ios });
    }
  }
  console.log(
    `${server.name}: guest booted in ${(run.bootMs / 1000).toFixed(1)} s, ran ${(run.totalMs / 1000).toFixed(1)} s`,
  );
  return figures;
}

const report = new BenchReport('vhost');
const results = new Map<string, Map<string, Figure>>();
try {
  report.note(
    `guest: ${hasHardwareKvm() ? 'KVM' : 'TCG (no hardware KVM)'}; ${
      PIN ? 'daemon on CPU 0, QEMU on CPU 1' : 'unpinned (nproc is not 2)'
    }; ${RUNTIME_S} s per workload after a ${WARMUP_S} s warm-up of each, best of ${ROUNDS}, ${IMAGE_MIB} MiB raw image on tmpfs`,
  );
  for (const server of SERVERS) {
    // A new image for each server: each one's runs start from the same sparse file (the
    // other's writes would leave data where a read of a hole is cheaper on tmpfs).
    const image = join(dir, 'disk.raw');
    rmSync(image, { force: true });
    makeImage(image, 'raw', `${IMAGE_MIB}M`);
    try {
      results.set(server.name, await measure(server, image));
    } catch (e) {
      const why = (e as Error).message.split('\n').find((l) => l.trim() !== '') ?? '';
      if (server === VM_DISK && why.includes("does not accept value 'vhost-user-blk'")) {
        console.log(`vm-disk: skipped, its vhost-user-blk export is refused (${why.trim()})`);
        report.note('vm-disk skipped: its vhost-user-blk export is refused');
      } else {
        throw e;
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

// The guest's rates first, then the daemons' CPU time per I/O for the same runs.
for (const w of WORKLOADS) {
  for (const [server, figures] of results) {
    const f = figures.get(w.name);
    if (f !== undefined) report.add(w.name, server, f.rate, w.bs === 4096 ? 'IOPS' : 'MiB/s');
  }
}
for (const w of WORKLOADS) {
  for (const [server, figures] of results) {
    const f = figures.get(w.name);
    if (f !== undefined)
      report.add(`${w.name}: daemon CPU`, server, f.cpuUsPerIo, 'µs/IO', 'lower');
  }
}
report.flush();
