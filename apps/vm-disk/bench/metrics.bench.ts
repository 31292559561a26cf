// What metrics cost: `vm-disk serve` serving the same image to fio's nbd engine (4 KiB
// random reads, iodepth 32, a unix socket) without --metrics and with it, scraped once a
// second meanwhile (as Prometheus would). Raw and qcow2 images; the two take turns, best
// of VMDISK_BENCH_ROUNDS (2) rounds; the ratio on/off is the figure (target: >= 0.95).
// On a 2-CPU machine the server runs on CPU 0 and fio on CPU 1, as in serve.bench.ts.
// The nodes' accounting itself is always on (query-blockstats reads it): both runs pay for
// it; this measures the endpoint and its scrapes.
// Run with plain node after `nx build vm-disk` (it starts the built bin).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const CLI = new URL('../dist/cli.js', import.meta.url).pathname;
const RUNTIME_S = Number(process.env.VMDISK_BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.VMDISK_BENCH_ROUNDS ?? 2);
const IMAGE = process.env.VMDISK_BENCH_IMAGE_SIZE ?? '512M';
const dir = mkdtempSync(join(tmpdir(), 'vmdisk-metrics-bench-'));

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const PIN = sh('nproc', []).trim() === '2';
const pinned = (cpu: number, cmd: string, args: string[]): [string, string[]] =>
  PIN ? ['taskset', ['-c', String(cpu), cmd, ...args]] : [cmd, args];

async function waitForSocket(path: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) {
    if (child.exitCode !== null) throw new Error('server exited');
    await new Promise((r) => setTimeout(r, 50));
  }
}

function fio(sock: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      ...pinned(1, 'fio', [
        '--name=bench',
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${sock}`,
        '--rw=randread',
        '--bs=4k',
        '--iodepth=32',
        '--size=100%',
        `--runtime=${RUNTIME_S}`,
        '--time_based',
        '--output-format=json',
      ]),
    );
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited ${code}`));
      resolve(JSON.parse(out.slice(out.indexOf('{'))).jobs[0].read.iops);
    });
  });
}

/** GETs /metrics on the unix socket; resolves with the body's length. */
function scrape(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: '/metrics' }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => {
        n += d.length;
      });
      res.on('end', () => resolve(n));
    });
    req.on('error', reject);
    req.end();
  });
}

async function measure(image: string, format: string, metrics: boolean): Promise<number> {
  const sock = join(dir, 'nbd.sock');
  const metricsSock = join(dir, 'metrics.sock');
  rmSync(sock, { force: true });
  const args = [
    'serve',
    '--blockdev',
    `driver=file,node-name=f0,filename=${image}`,
    '--blockdev',
    `driver=${format},node-name=d0,file=f0`,
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}`,
    '--export',
    'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
    ...(metrics ? ['--metrics', `addr.type=unix,addr.path=${metricsSock}`] : []),
  ];
  const child = spawn(...pinned(0, process.execPath, [CLI, ...args]), {
    stdio: 'ignore',
    env: { ...process.env, VMDISK_LOG_LEVEL: 'warn' },
  });
  let scrapes = 0;
  const scraper = metrics
    ? setInterval(() => {
        scrape(metricsSock).then(
          () => scrapes++,
          () => {},
        );
      }, 1000)
    : undefined;
  try {
    await waitForSocket(sock, child);
    const iops = await fio(sock);
    if (metrics && scrapes === 0) throw new Error('the metrics endpoint was never scraped');
    return iops;
  } finally {
    clearInterval(scraper);
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
}

const rows: string[] = [];
try {
  for (const format of ['raw', 'qcow2']) {
    const image = join(dir, `image.${format}`);
    sh('qemu-img', [
      'create',
      '-q',
      '-f',
      format,
      ...(format === 'qcow2' ? ['-o', 'preallocation=metadata'] : []),
      image,
      IMAGE,
    ]);
    sh('qemu-io', ['-f', format, '-c', `write -P 0x5a 0 ${IMAGE}`, image]);
    let off = 0;
    let on = 0;
    // Turns alternate which goes first, so that neither always meets a cold page cache.
    for (let round = 0; round < ROUNDS; round++) {
      for (const metrics of round % 2 === 0 ? [false, true] : [true, false]) {
        const iops = await measure(image, format, metrics);
        if (metrics) on = Math.max(on, iops);
        else off = Math.max(off, iops);
      }
    }
    const row = `| ${format} | 4k randread | ${Math.round(off)} | ${Math.round(on)} | ${(on / off).toFixed(3)} |`;
    console.log(row);
    rows.push(row);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(
  `\n| image | workload | IOPS metrics off | IOPS metrics on | on/off |\n|---|---|---|---|---|`,
);
for (const r of rows) console.log(r);
