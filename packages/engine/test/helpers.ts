// Shared by the tests: temporary files in os.tmpdir(), removed by cleanup().
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackendName } from '../src/index.ts';

export const BACKENDS: BackendName[] = ['io_uring', 'aio', 'threadpool'];

export function tempDir(base = tmpdir()): {
  dir: string;
  file: (name: string) => string;
  cleanup: () => void;
} {
  const dir = mkdtempSync(join(base, 'vmdisk-engine-'));
  return {
    dir,
    file: (name) => join(dir, name),
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** A deterministic pseudo-random generator (mulberry32), so that a failure repeats. */
export function rng(seed: number): (n: number) => number {
  let s = seed >>> 0;
  return (n) => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * n;
  };
}

export function fill(buf: Uint8Array, rand: (n: number) => number): void {
  for (let i = 0; i < buf.length; i++) buf[i] = rand(256) | 0;
}
