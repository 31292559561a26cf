// A mirror copies data below the buffers where source and target files allow it
// (NodeCopy.copyFrom: copy_file_range between the files), and reads and writes where they
// do not (files on two file systems: EXDEV; a target that detects zeros), the qcow2
// target's allocations for the refused copies given back, and operations started after a
// refusal not asking again; ranges of 16 KiB or less are always read and written. Either
// way the target ends as the source (qemu-img compare), a qcow2 target is clean (qemu-img
// check: no leaked cluster), and the target's dirty bitmaps see every byte written.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BlockGraph } from '../src/index.ts';
import type { BlockNode } from '../src/node.ts';
import { mirrorToReady } from './helpers.ts';

const MiB = 1024 * 1024;
const SIZE = 48 * MiB;

/** tmpfs for the source (and the target that shares its file system). */
const SHM = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
let shm: string;
/** A directory on the disk's file system (another one than tmpfs): copies there fail EXDEV. */
let disk: string;

beforeEach(() => {
  shm = mkdtempSync(join(SHM, 'vmdisk-mirror-copy-'));
  disk = mkdtempSync(join(tmpdir(), 'vmdisk-mirror-copy-'));
});
afterEach(() => {
  rmSync(shm, { recursive: true, force: true });
  rmSync(disk, { recursive: true, force: true });
});

/** A qcow2 with data in several runs, a zero cluster range and a hole. */
function makeSource(): string {
  const src = join(shm, 'src.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(SIZE)]);
  execFileSync('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x11 0 5M',
    '-c',
    'write -P 0x22 7M 3M',
    '-c',
    'write -z 11M 1M',
    '-c',
    'write -P 0x33 20M 24M',
    src,
  ]);
  return src;
}

/** A qcow2 whose every byte is data. */
function makeFullSource(): string {
  const src = join(shm, 'src.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(SIZE)]);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x66 0 ${SIZE}`, src]);
  return src;
}

/** A sparse raw file on tmpfs: 4 KiB of data every 256 KiB (holes between). */
function makeSparseSource(): string {
  const src = join(shm, 'src.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', src, String(SIZE)]);
  const cmds = [];
  for (let off = 0; off < SIZE; off += 256 * 1024) cmds.push('-c', `write -P 0x44 ${off} 4k`);
  execFileSync('qemu-io', ['-f', 'raw', ...cmds, src]);
  return src;
}

interface MirrorSetup {
  targetOptions?: Record<string, unknown>;
  /** A sparse raw source mirrored with a granularity of 4 KiB. */
  sparse?: boolean;
  /** A source that is all data. */
  full?: boolean;
  bufSize?: number;
}

async function mirror(fmt: 'qcow2' | 'raw', dir: string, setup: MirrorSetup = {}) {
  const src = setup.sparse ? makeSparseSource() : setup.full ? makeFullSource() : makeSource();
  const srcFmt = setup.sparse ? 'raw' : 'qcow2';
  const dst = join(dir, `dst.${fmt}`);
  execFileSync('qemu-img', ['create', '-q', '-f', fmt, dst, String(SIZE)]);
  const graph = new BlockGraph();
  try {
    await graph.add({ driver: 'file', 'node-name': 'sf', filename: src });
    await graph.add({ driver: srcFmt, 'node-name': 'src', file: 'sf' });
    await graph.add({
      driver: fmt,
      'node-name': 'dst',
      file: { driver: 'file', filename: dst },
      ...setup.targetOptions,
    });
    const target = graph.node('dst') as BlockNode;
    const bitmap = target.createDirtyBitmap(65536);
    // How often the mirror asks the target to copy below the buffers.
    let copies = 0;
    const copyFrom = target.copyFrom.bind(target);
    target.copyFrom = (...args) => {
      copies++;
      return copyFrom(...args);
    };
    const bj = await mirrorToReady(graph, {
      device: 'src',
      target: 'dst',
      ...(setup.sparse && { granularity: 4096 }),
      ...(setup.bufSize !== undefined && { bufSize: setup.bufSize }),
    });
    const source = graph.node('src') as BlockNode;
    const seen = {
      sourceRead: source.stats.counters('read').bytes,
      targetWritten: target.stats.counters('write').bytes,
      dirty: bitmap.count(),
      copies,
    };
    bj.job.cancel(false);
    await bj.job.wait().catch(() => {});
    target.releaseDirtyBitmap(bitmap);
    return { src, srcFmt, dst, seen };
  } finally {
    await graph.close();
  }
}

/** 5M + 3M + 24M of data; the rest is written as zeros. */
const DATA = 32 * MiB;
/** Operations in flight at most (QEMU's MAX_IN_FLIGHT). */
const IN_FLIGHT = 16;
const compare = (src: string, dst: string, fmt: string, srcFmt = 'qcow2') =>
  execFileSync('qemu-img', ['compare', '-f', srcFmt, '-F', fmt, src, dst], { encoding: 'utf8' });

describe('mirror copies below the buffers', () => {
  for (const fmt of ['qcow2', 'raw'] as const) {
    it(`to a ${fmt} on the same file system: no read through a buffer`, async () => {
      const { src, dst, seen } = await mirror(fmt, shm);
      expect(compare(src, dst, fmt)).toContain('Images are identical');
      expect(seen.sourceRead).toBe(0);
      expect(seen.targetWritten).toBe(DATA);
      // One copy per operation over data (zeros go as write-zeroes): 1 MiB ones, 4 MiB
      // ones once a copy has worked (which depends on what finishes first).
      expect(seen.copies).toBeGreaterThanOrEqual(DATA / (4 * MiB));
      expect(seen.copies).toBeLessThanOrEqual(DATA / MiB);
      // A full mirror onto an existing image writes all of it (zeros as zeros): all dirty.
      expect(seen.dirty).toBe(SIZE);
      if (fmt === 'qcow2') execFileSync('qemu-img', ['check', '-q', dst]);
    });

    it(`to a ${fmt} on another file system: read and written instead`, async () => {
      const { src, dst, seen } = await mirror(fmt, disk);
      expect(compare(src, dst, fmt)).toContain('Images are identical');
      expect(seen.sourceRead).toBe(DATA);
      expect(seen.targetWritten).toBe(DATA);
      expect(seen.dirty).toBe(SIZE);
      // Refused (EXDEV): asked only by the operations under way at the first refusal.
      expect(seen.copies).toBeGreaterThan(0);
      expect(seen.copies).toBeLessThanOrEqual(IN_FLIGHT);
      // The refused copy's clusters were given back before the writes allocated theirs.
      if (fmt === 'qcow2') execFileSync('qemu-img', ['check', '-q', dst]);
    });
  }

  it('to a qcow2 in operations over several of its allocations (4 MiB: buf-size 64 MiB)', async () => {
    // A qcow2 allocation takes at most 32 clusters (2 MiB): each copy is two mappings.
    const { src, dst, seen } = await mirror('qcow2', shm, { bufSize: 64 * MiB });
    expect(compare(src, dst, 'qcow2')).toContain('Images are identical');
    expect(seen.sourceRead).toBe(0);
    expect(seen.targetWritten).toBe(DATA);
    execFileSync('qemu-img', ['check', '-q', dst]);
  });

  it('in operations of 4 MiB once a copy has worked (buf-size / 4)', async () => {
    const { src, dst, seen } = await mirror('qcow2', shm, { full: true });
    expect(compare(src, dst, 'qcow2')).toContain('Images are identical');
    expect(seen.sourceRead).toBe(0);
    // The first area (buf-size, 16 MiB) goes in 1 MiB operations, issued before any ends;
    // the first to end is a copy that worked, and the rest go 4 MiB at a time.
    expect(seen.copies).toBe(16 + (SIZE - 16 * MiB) / (4 * MiB));
    execFileSync('qemu-img', ['check', '-q', dst]);
  });

  it('not where the target detects zeros (that needs the data in a buffer)', async () => {
    const { src, dst, seen } = await mirror('qcow2', shm, {
      targetOptions: { 'detect-zeroes': 'on' },
    });
    expect(compare(src, dst, 'qcow2')).toContain('Images are identical');
    expect(seen.sourceRead).toBe(DATA);
    expect(seen.copies).toBeGreaterThan(0);
    expect(seen.copies).toBeLessThanOrEqual(IN_FLIGHT);
    execFileSync('qemu-img', ['check', '-q', dst]);
  });

  it('not for small ranges (read and written inline by the engine)', async () => {
    const { src, srcFmt, dst, seen } = await mirror('raw', shm, { sparse: true });
    expect(compare(src, dst, 'raw', srcFmt)).toContain('Images are identical');
    expect(seen.copies).toBe(0);
    expect(seen.sourceRead).toBe((SIZE / (256 * 1024)) * 4096);
  });
});
