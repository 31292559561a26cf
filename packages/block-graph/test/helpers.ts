// Test helpers: temporary files (cleaned up), patterns, qemu-img.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export function tempDir(): {
  dir: string;
  path(name: string): string;
  /** Writes `data` to the file `name` of the directory; returns its path. */
  file(name: string, data: Uint8Array): string;
  cleanup(): void;
} {
  const dir = mkdtempSync(join(tmpdir(), 'block-graph-'));
  return {
    dir,
    path: (name) => join(dir, name),
    file: (name, data) => {
      writeFileSync(join(dir, name), data);
      return join(dir, name);
    },
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Deterministic bytes for (seed, offset): verifiable without keeping a copy. */
export function pattern(seed: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const x = offset + i;
    buf[i] = (x * 31 + seed * 17 + (x >>> 9)) & 0xff;
  }
  return buf;
}

export function writeFile(path: string, data: Uint8Array): void {
  writeFileSync(path, data);
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}
