// Test helpers for the qcow2 tests: a real file behind the Qcow2File interface (node:fs),
// running qemu-img / qemu-io, and temporary directories.

import { execFile } from 'node:child_process';
import type { FileHandle } from 'node:fs/promises';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Qcow2File } from '../src/drivers/qcow2/types.ts';

/** A Qcow2File over a real file (node:fs). */
export class FsFile implements Qcow2File {
  readonly path: string;
  readonly #fh: FileHandle;
  constructor(path: string, fh: FileHandle) {
    this.path = path;
    this.#fh = fh;
  }
  static async open(
    path: string,
    opts: { readOnly?: boolean; create?: boolean } = {},
  ): Promise<FsFile> {
    const flags = opts.readOnly ? 'r' : opts.create ? 'w+' : 'r+';
    return new FsFile(path, await open(path, flags));
  }
  async read(buf: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.#fh.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }
  async write(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.#fh.write(buf, done, buf.length - done, offset + done);
      done += bytesWritten;
    }
  }
  async size(): Promise<number> {
    return (await this.#fh.stat()).size;
  }
  async truncate(size: number): Promise<void> {
    await this.#fh.truncate(size);
  }
  async flush(): Promise<void> {
    await this.#fh.datasync();
  }
  async close(): Promise<void> {
    await this.#fh.close();
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program; resolves with its exit code and output (never rejects on a non-zero exit). */
export function run(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code !== 'number') {
        reject(err);
        return;
      }
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

/** Runs a program that must succeed. */
export async function must(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0)
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export async function tempDir(): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'qcow2-test-'));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** A deterministic pseudo-random generator (xorshift32). */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Fills `buf` with a pattern that depends on `seed` and the position. */
export function pattern(buf: Uint8Array, seed: number): Uint8Array {
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = x & 0xff;
  }
  return buf;
}

/** First differing offset of two buffers, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}
