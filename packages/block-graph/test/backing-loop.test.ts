// Backing chains that loop (a self-loop, a -> b -> a, through other names of the same file)
// or go too deep fail promptly with a clear error naming the file and a stable code, and
// leave nothing open: no node in the graph, no file descriptor.

import { readdirSync } from 'node:fs';
import { mkdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError, BlockErrorCode, BlockGraph, DEFAULT_MAX_BACKING_DEPTH } from '../src/index.ts';
import { must, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
let fdsBefore = 0;
const openFds = () => readdirSync('/proc/self/fd').length;

beforeAll(async () => {
  // The engine keeps a few descriptors (its ring) once used: count after a first use.
  const warm = join(dir, 'warm.qcow2');
  await must('qemu-img', ['create', '-f', 'qcow2', warm, '1M']);
  const g = new BlockGraph();
  await g.add({ driver: 'qcow2', 'node-name': 'w', file: { driver: 'file', filename: warm } });
  await g.close();
  fdsBefore = openFds();
});
afterAll(cleanup);

async function qcow2(name: string, backing?: string): Promise<string> {
  const path = join(dir, name);
  const b = backing === undefined ? [] : ['-u', '-b', backing, '-F', 'qcow2'];
  await must('qemu-img', ['create', '-f', 'qcow2', ...b, path, '1M']);
  return path;
}

/** Points the header of `path` at `backing` without opening anything (qemu-img rebase -u). */
async function rebase(path: string, backing: string): Promise<void> {
  await must('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', path]);
}

/** blockdev-add of `path` as qcow2; returns the error (after checking nothing stays open). */
async function openFails(
  path: string,
  graph = new BlockGraph(),
  extra: Record<string, unknown> = {},
): Promise<BlockError> {
  let error: unknown;
  try {
    await graph.add({
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: path },
      ...extra,
    });
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(BlockError);
  expect(graph.query()).toEqual([]);
  await graph.close();
  expect(openFds()).toBe(fdsBefore);
  return error as BlockError;
}

describe('backing chains that loop', () => {
  it('an image that is its own backing file', { timeout: 20_000 }, async () => {
    const self = await qcow2('self.qcow2');
    await rebase(self, 'self.qcow2');
    for (const readOnly of [false, true]) {
      const err = await openFails(self, new BlockGraph(), { 'read-only': readOnly });
      expect(err.code).toBe(BlockErrorCode.BACKING_LOOP);
      expect(err.message).toBe(`Backing file '${self}' creates an infinite loop`);
      expect((err as BlockError & { filename: string }).filename).toBe(self);
    }
  });

  it('a -> b -> a, opened from either end', { timeout: 20_000 }, async () => {
    const a = await qcow2('loop-a.qcow2');
    const b = await qcow2('loop-b.qcow2', 'loop-a.qcow2');
    await rebase(a, 'loop-b.qcow2');
    const fromA = await openFails(a);
    expect(fromA.code).toBe(BlockErrorCode.BACKING_LOOP);
    expect(fromA.message).toContain(`'${a}'`);
    const fromB = await openFails(b);
    expect(fromB.code).toBe(BlockErrorCode.BACKING_LOOP);
    expect(fromB.message).toContain(`'${b}'`);
  });

  it('a loop through other names of the same file (symlink, absolute, ./sub/..) is found by inode', {
    timeout: 20_000,
  }, async () => {
    await mkdir(join(dir, 'sub'));
    const a = await qcow2('names-a.qcow2');
    await qcow2('names-b.qcow2', join(dir, 'names-a.qcow2')); // absolute name
    await symlink('names-b.qcow2', join(dir, 'names-link.qcow2'));
    await rebase(a, './sub/../names-link.qcow2'); // a -> (link to b) -> a
    const err = await openFails(join(dir, 'sub', '..', 'names-a.qcow2'));
    expect(err.code).toBe(BlockErrorCode.BACKING_LOOP);
    expect(err.message).toContain('creates an infinite loop');
  });

  it('a loop below a file node added by name is found too', { timeout: 20_000 }, async () => {
    const self = await qcow2('byname.qcow2');
    await rebase(self, 'byname.qcow2');
    const g = new BlockGraph();
    await g.add({ driver: 'file', 'node-name': 'f0', filename: self });
    let error: unknown;
    try {
      await g.add({ driver: 'qcow2', 'node-name': 'top', file: 'f0' });
    } catch (e) {
      error = e;
    }
    expect((error as BlockError).code).toBe(BlockErrorCode.BACKING_LOOP);
    expect(g.query().map((n) => n['node-name'])).toEqual(['f0']);
    await g.close();
    expect(openFds()).toBe(fdsBefore);
  });

  it('one base under two overlays, or named twice along a chain by other means, is no loop', async () => {
    const base = await qcow2('shared-base.qcow2');
    const t1 = await qcow2('t1.qcow2', 'shared-base.qcow2');
    const t2 = await qcow2('t2.qcow2', 'shared-base.qcow2');
    const g = new BlockGraph();
    await g.add({ driver: 'qcow2', 'node-name': 't1', file: { driver: 'file', filename: t1 } });
    await g.add({ driver: 'qcow2', 'node-name': 't2', file: { driver: 'file', filename: t2 } });
    // An explicit backing of the base for an image of it: finite, since 'backing' is given.
    await g.add({
      driver: 'qcow2',
      'node-name': 'b2',
      'read-only': true,
      file: { driver: 'file', filename: base },
      backing: {
        driver: 'qcow2',
        file: { driver: 'file', filename: base },
        backing: null,
      },
    });
    expect(g.query().filter((n) => n.driver === 'qcow2')).toHaveLength(6);
    await g.close();
  });
});

describe('backing chains that are too deep', () => {
  it('are refused past the graph limit, naming the file, with nothing left open', {
    timeout: 30_000,
  }, async () => {
    expect(DEFAULT_MAX_BACKING_DEPTH).toBe(1000);
    // deep0 <- deep1 <- ... <- deep5: deep5 has 5 backing files below it.
    let below: string | undefined;
    for (let i = 0; i <= 5; i++) {
      await qcow2(`deep${i}.qcow2`, below);
      below = `deep${i}.qcow2`;
    }
    const ok = new BlockGraph({ maxBackingDepth: 5 });
    await ok.add({
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: join(dir, 'deep5.qcow2') },
    });
    expect(ok.query().filter((n) => n.driver === 'qcow2')).toHaveLength(6);
    await ok.close();
    const err = await openFails(join(dir, 'deep5.qcow2'), new BlockGraph({ maxBackingDepth: 4 }));
    expect(err.code).toBe(BlockErrorCode.BACKING_CHAIN_TOO_DEEP);
    expect(err.message).toBe(
      `Backing file '${join(dir, 'deep0.qcow2')}' is too deep in the backing chain (more than 4 backing files)`,
    );
    // Inline backing specs count too.
    const inline = await openFails(
      join(dir, 'deep1.qcow2'),
      new BlockGraph({ maxBackingDepth: 0 }),
      {
        backing: { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'deep0.qcow2') } },
      },
    );
    expect(inline.code).toBe(BlockErrorCode.BACKING_CHAIN_TOO_DEEP);
  });
});
