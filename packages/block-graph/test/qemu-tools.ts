// Test helpers for the qcow2 tests: running qemu-img / qemu-io, and temporary directories.

import { execFile } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

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

/** `qemu-img create -f qcow2 [-u] [-o O] [-b BACKING -F BACKINGFORMAT] PATH SIZE`. */
export function qemuImgCreate(
  path: string,
  size: number | string,
  opts: { o?: string; backing?: string; backingFormat?: string; unsafe?: boolean } = {},
): Promise<string> {
  const args = ['create', '-f', 'qcow2'];
  if (opts.unsafe) args.push('-u');
  if (opts.o !== undefined) args.push('-o', opts.o);
  if (opts.backing !== undefined) args.push('-b', opts.backing, '-F', opts.backingFormat ?? 'raw');
  return must('qemu-img', [...args, path, String(size)]);
}

/** A temporary directory (made at once) and the call that removes it. */
export function tempDir(): { dir: string; cleanup: () => Promise<void> } {
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-test-'));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}
