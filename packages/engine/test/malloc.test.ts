// glibc's thresholds as setMallocMmapThreshold leaves them, observed in a child process
// (mallopt is for the whole process): a heap block freed and allocated again keeps its
// pages, counted as the child's minor page faults.
import { spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

const NATIVE = pathToFileURL(fileURLToPath(new URL('../src/native.ts', import.meta.url))).href;
const ROUNDS = 32;
const BLOCK = 1024 * 1024;
/** Blocks out at once: more than the holes loading TypeScript leaves in the heap (~9 MiB here). */
const IN_FLIGHT = 12;

// Below an 8 MiB mmap threshold (the rbd driver's), allocates and fills IN_FLIGHT 1 MiB
// blocks on the main thread (librbd's copies of writes in flight), frees them, ROUNDS
// times, and prints the minor faults those rounds took.
const script = `
import koffi from 'koffi';
import { readFileSync } from 'node:fs';
import { setMallocMmapThreshold } from '${NATIVE}';
const libc = koffi.load('libc.so.6');
const malloc = libc.func('void *malloc(size_t size)');
const free = libc.func('void free(void *p)');
const memset = libc.func('void *memset(void *s, int c, size_t n)');
const minflt = () => {
  const st = readFileSync('/proc/self/stat', 'utf8');
  return Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[7]);
};
if (!setMallocMmapThreshold(8 << 20)) throw new Error('no mallopt');
const round = () => {
  const blocks = [];
  for (let i = 0; i < ${IN_FLIGHT}; i++) {
    const p = malloc(${BLOCK});
    memset(p, 1, ${BLOCK});
    blocks.push(p);
  }
  for (const p of blocks) free(p);
};
round();
const before = minflt();
for (let i = 0; i < ${ROUNDS}; i++) round();
console.log('minor-faults=' + (minflt() - before));
`;

function childFaults(): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      cwd: fileURLToPath(new URL('..', import.meta.url)),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    let err = '';
    child.stderr.on('data', (d) => {
      err += d;
    });
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) reject(new Error(`child exited ${code}: ${err}`));
      else {
        // Only our line counts: anything else the child may print (a warning from the
        // environment) is not the figure.
        const m = /^minor-faults=(\d+)$/m.exec(out);
        if (m) resolve(Number(m[1]));
        else reject(new Error(`no fault count in the child's output: ${JSON.stringify(out)}`));
      }
    });
  });
}

describe('setMallocMmapThreshold', () => {
  it('1 MiB heap blocks freed and taken again keep their pages (trim threshold raised too)', async () => {
    const faults = await childFaults();
    // Trimmed each time, the blocks' pages fault in again every round (~98000 in all).
    expect(faults).toBeLessThan((ROUNDS * IN_FLIGHT * BLOCK) / 4096 / 8);
  });
});
