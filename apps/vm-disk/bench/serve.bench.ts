// The comparison users make: `vm-disk serve` against qemu-storage-daemon given the same
// command line (and for raw, nbdkit's file plugin and an embedder's NbdServer with
// FileTarget, over node:fs and over an @vmdisk/engine EngineFile), serving the same image over a unix
// socket to fio's nbd engine at iodepth 32, images on tmpfs. Raw and qcow2 images; 4 KiB random read,
// 4 KiB random write, 256 KiB sequential read. Servers take turns (the first alternating by
// round), best of 2 rounds.
// On a 2-CPU machine each server runs pinned to CPU 0 (`taskset -c 0`) and fio to CPU 1
// (`taskset -c 1`), so that server and client do not share a core; otherwise unpinned.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BenchReport } from '../../../scripts/bench/report.ts';
import {
  fio,
  makeImage,
  NBDKIT,
  PIN,
  pinned,
  QSD,
  type Server,
  stop,
  VM_DISK,
  waitForSocket,
} from './support.ts';

const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 3);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
// tmpfs where there is one, as the jobs bench: on ext4 a freshly written image's large
// page-cache folios turn each 4 KiB random write into a large writeback, and every server
// measured that (3x slower than on an image rewritten before) rather than its own work.
const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
const dir = mkdtempSync(join(base, 'vmdisk-serve-bench-'));

/**
 * An embedder's server (embedded-nbd.ts): @vmdisk/nbd's NbdServer and FileTarget, the file
 * read and written through node:fs or an @vmdisk/engine EngineFile. Raw images only.
 */
const embedded = (io: 'fs' | 'engine'): Server => ({
  name: `NbdServer + FileTarget (${io === 'fs' ? 'node:fs' : 'EngineFile'})`,
  start: (image, _format, sock) =>
    spawn(...pinned(0, process.execPath, [EMBEDDED_NBD, io, image, sock]), { stdio: 'ignore' }),
});
const EMBEDDED_NBD = new URL('./embedded-nbd.ts', import.meta.url).pathname;
const EMBEDDED = [embedded('engine'), embedded('fs')];

const WORKLOADS = [
  { name: '4k randread', rw: 'randread', bs: '4k' },
  { name: '4k randwrite', rw: 'randwrite', bs: '4k' },
  { name: '256k seqread', rw: 'read', bs: '256k' },
];

async function measure(
  server: Server,
  image: string,
  format: string,
  w: (typeof WORKLOADS)[number],
): Promise<number> {
  const sock = join(dir, `${server.name.replace(/\W/g, '')}.sock`);
  rmSync(sock, { force: true });
  const child = server.start(image, format, sock);
  try {
    await waitForSocket(sock, child);
    const job = await fio(sock, { rw: w.rw, bs: w.bs, runtime: RUNTIME_S });
    const side = w.rw.includes('write') ? job.write : job.read;
    return w.bs === '4k' ? side.iops : side.bw / 1024;
  } finally {
    await stop(child);
  }
}

const report = new BenchReport('serve');
report.note(
  PIN
    ? 'pinning: each server on CPU 0 (taskset -c 0), fio on CPU 1 (taskset -c 1)'
    : 'pinning skipped: nproc is not 2 (servers and fio unpinned)',
);
report.note(`${IMAGE} image in ${base}; fio nbd engine, iodepth 32, ${RUNTIME_S} s, best of 2`);
try {
  for (const format of ['raw', 'qcow2']) {
    const image = join(dir, `image.${format}`);
    makeImage(image, format, IMAGE);
    const servers = format === 'raw' ? [VM_DISK, QSD, NBDKIT, ...EMBEDDED] : [VM_DISK, QSD];
    for (const w of WORKLOADS) {
      const best = new Map<string, number>();
      for (let round = 0; round < 2; round++) {
        // Which server goes first alternates: a run leaves the next one its page cache
        // and its writeback.
        for (const s of round % 2 === 0 ? servers : [...servers].reverse())
          best.set(s.name, Math.max(best.get(s.name) ?? 0, await measure(s, image, format, w)));
      }
      for (const [server, figure] of best)
        report.add(`${format} ${w.name}`, server, figure, w.bs === '4k' ? 'IOPS' : 'MiB/s');
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.flush();
