// Crash safety: a child process doing random writes and flushes (qcow2-crash-child.ts) is
// killed with SIGKILL at a random moment (after its first completed flush). Afterwards `qemu-img check` finds no corruption
// (leaks are allowed) and every byte written by a batch whose flush completed reads back
// (bytes touched by the batch in flight are not judged). Images with lazy refcounts are
// left dirty by the crash: our driver repairs them on a read-write open, and then
// `qemu-img check` must find them clean.
//
// A killed process loses nothing the kernel already accepted: this exercises the order of
// our writes and flushes as seen by the file, not a power failure.

import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { ImageFile, pattern, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

const child = new URL('./qcow2-crash-child.ts', import.meta.url).pathname;

interface Op {
  k: string;
  off: number;
  len: number;
  seed: number;
}

async function runAndKill(args: string[], killAfterMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [child, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    p.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (!timer && out.includes('"flushed"'))
        timer = setTimeout(() => p.kill('SIGKILL'), killAfterMs);
    });
    p.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    p.on('error', reject);
    p.on('exit', (_code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL') reject(new Error(`child ended by itself (${_code}): ${err}`));
      else resolve(out);
    });
  });
}

const variants = [
  { name: 'v3 64k', opts: 'compat=1.1', size: 12 << 20, backing: false, l2: '-', mode: 'core' },
  {
    name: 'v3 lazy refcounts 16k',
    opts: 'lazy_refcounts=on,cluster_size=16k',
    size: 12 << 20,
    backing: false,
    l2: '-',
    mode: 'core',
  },
  {
    name: 'v3 extended L2 over a backing file',
    opts: 'extended_l2=on',
    size: 12 << 20,
    backing: true,
    l2: '-',
    mode: 'core',
  },
  {
    name: 'v2 4k clusters, 3-table L2 cache',
    opts: 'compat=0.10,cluster_size=4k',
    size: 8 << 20,
    backing: true,
    l2: String(3 * 4096),
    mode: 'core',
  },
  {
    name: 'through the graph: v3 32k over a backing file',
    opts: 'cluster_size=32k',
    size: 12 << 20,
    backing: true,
    l2: '-',
    mode: 'graph',
  },
  {
    name: 'through the graph: v3 extended L2, lazy refcounts',
    opts: 'extended_l2=on,lazy_refcounts=on',
    size: 12 << 20,
    backing: false,
    l2: '-',
    mode: 'graph',
  },
];

describe('qcow2 crash safety (SIGKILL at random moments)', () => {
  for (const [vi, v] of variants.entries()) {
    it(`${v.name}: 3 runs`, async () => {
      const r = rng(vi + 31);
      for (let run_ = 0; run_ < 3; run_++) {
        const path = join(dir, `crash${vi}-${run_}.qcow2`);
        const model = new Uint8Array(v.size);
        const clusterSize = Number(/cluster_size=(\d+)k/.exec(v.opts)?.[1] ?? 64) * 1024;
        const unit = v.opts.includes('extended_l2=on') ? clusterSize / 32 : clusterSize;
        const v3 = !v.opts.includes('0.10');
        let basePath = '-';
        let base: Uint8Array | null = null;
        if (v.backing) {
          basePath = join(dir, `crash${vi}-${run_}.base`);
          base = pattern(new Uint8Array(v.size - (1 << 20)), vi * 10 + run_);
          await writeFile(basePath, base);
          model.set(base);
          await qemuImgCreate(path, v.size, { o: v.opts, backing: basePath });
        } else {
          await qemuImgCreate(path, v.size, { o: v.opts });
        }
        const out = await runAndKill(
          [path, basePath, String(vi * 1000 + run_ + 1), v.l2, v.mode],
          Math.floor(r() * 500),
        );
        const lines = out
          .split('\n')
          .filter((l) => l.startsWith('{'))
          .map((l) => JSON.parse(l) as { t: string; n: number; ops: Op[] });
        let lastFlushed = -1;
        for (const l of lines) if (l.t === 'flushed') lastFlushed = l.n;
        const uncertain = new Uint8Array(v.size);
        for (const l of lines) {
          if (l.t !== 'batch') continue;
          for (const o of l.ops) {
            if (l.n > lastFlushed) {
              uncertain.fill(1, o.off, o.off + o.len);
              continue;
            }
            if (o.k === 'w') model.set(pattern(new Uint8Array(o.len), o.seed), o.off);
            else if (o.k === 'z') model.fill(0, o.off, o.off + o.len);
            else {
              const a = Math.ceil(o.off / unit) * unit;
              const b = Math.floor((o.off + o.len) / unit) * unit;
              for (let u = a; u < b; u += unit) {
                if (!v3 && base) {
                  model.fill(0, u, u + unit);
                  model.set(
                    base.subarray(Math.min(u, base.length), Math.min(u + unit, base.length)),
                    u,
                  );
                } else model.fill(0, u, u + unit);
              }
            }
          }
        }
        const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-U', path]));
        if (info['dirty-flag']) {
          // Lazy refcounts: repair through our read-write open, then judge.
          expect(v.opts).toContain('lazy_refcounts=on');
          const f = await ImageFile.open(path);
          const img = await openQcow2(f, { backing: null });
          await img.close();
          await f.close();
        }
        const check = await run('qemu-img', ['check', '-f', 'qcow2', path]);
        expect(check.code === 0 || check.code === 3, `${check.stdout}${check.stderr}`).toBe(true);
        expect(check.stdout).not.toMatch(/ERROR/);
        const rawPath = `${path}.raw`;
        await must('qemu-img', ['convert', '-O', 'raw', path, rawPath]);
        const got = new Uint8Array(await readFile(rawPath));
        let bad = -1;
        for (let i = 0; i < v.size; i++) {
          if (!uncertain[i] && got[i] !== model[i]) {
            bad = i;
            break;
          }
        }
        if (bad >= 0) {
          const touching = lines
            .filter((l) => l.t === 'batch')
            .flatMap((l) =>
              l.ops
                .filter((o) => o.off <= bad && bad < o.off + o.len)
                .map((o) => ({ n: l.n, ...o })),
            );
          let badEnd = bad;
          while (badEnd < v.size && !uncertain[badEnd] && got[badEnd] !== model[badEnd]) badEnd++;
          console.log(
            JSON.stringify({ bad, badEnd, got: got[bad], want: model[bad], lastFlushed, touching }),
          );
        }
        expect(bad, `run ${run_}: ${lastFlushed + 1} batches flushed`).toBe(-1);
        expect(lastFlushed).toBeGreaterThanOrEqual(0);
      }
    });
  }
});
