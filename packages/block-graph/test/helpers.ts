// Test helpers: temporary files (cleaned up), patterns, qemu-img.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { JobRegistry } from '@vmdisk/ao';
import { afterAll, afterEach, beforeEach } from 'vitest';
import { qcow2Driver } from '../src/drivers/qcow2/qcow2.ts';
import { BlockGraph, type BlockJob, blockdevMirror } from '../src/index.ts';

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

/** Runs a tool that must succeed; its standard output. */
export function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}

/**
 * For each test of the file: a fresh directory (named after `prefix`) and a BlockGraph;
 * after it the graph is closed and the directory removed. `graph` and `dir` change from
 * test to test: read them inside the tests.
 */
export function graphPerTest(prefix: string): {
  readonly graph: BlockGraph;
  readonly dir: string;
  /** A path in the test's directory. */
  p(name: string): string;
} {
  let dir = '';
  let graph: BlockGraph | undefined;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), prefix));
    graph = new BlockGraph();
  });
  afterEach(async () => {
    await graph?.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return {
    get graph() {
      return graph!;
    },
    get dir() {
      return dir;
    },
    p: (name) => join(dir, name),
  };
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

/**
 * A test file's qcow2 images and the graphs opening them (with the qcow2 driver): the
 * graphs closed, then the directory removed, after the file's tests.
 */
export function qcow2Fixture(): {
  tmp: ReturnType<typeof tempDir>;
  graph(): BlockGraph;
  /** A new qcow2 image of `size` (qemu-img's syntax) in the directory; its path. */
  qcow2(name: string, size?: string): string;
} {
  const tmp = tempDir();
  const graphs: BlockGraph[] = [];
  afterAll(async () => {
    for (const g of graphs) await g.close();
    tmp.cleanup();
  });
  return {
    tmp,
    graph: () => {
      const g = new BlockGraph({ drivers: [qcow2Driver] });
      graphs.push(g);
      return g;
    },
    qcow2: (name, size = '4M') => {
      const path = tmp.path(name);
      qemuImg('create', '-q', '-f', 'qcow2', path, size);
      return path;
    },
  };
}

/**
 * Starts a mirror sync=full from `device` to `target` (job j0, events dropped) and resolves
 * when it is ready; the caller cancels or completes it.
 */
export async function mirrorToReady(
  graph: BlockGraph,
  options: Omit<Parameters<typeof blockdevMirror>[2], 'jobId' | 'sync'>,
): Promise<BlockJob> {
  const jobs = new JobRegistry({ events: { push: () => {} } });
  const ready = new Promise<void>((resolve) =>
    jobs.onStatusChange((e) => {
      if (e.data.status === 'ready') resolve();
    }),
  );
  const bj = await blockdevMirror(graph, jobs, { jobId: 'j0', sync: 'full', ...options });
  await ready;
  return bj;
}
