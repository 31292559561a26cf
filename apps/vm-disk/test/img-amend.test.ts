// `vm-disk amend` against `qemu-img amend`: the same invocation on copies of the same
// images gives the same output and exit status, and images qemu-img describes, maps,
// checks and reads alike (snapshots included).
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { infoOf, makeSources, mapOf, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources & { snapshotted: string };
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-amend-'));
  const made = await makeSources(dir);
  // An overlay with zero clusters (with and without a host cluster) and a snapshot.
  const snapshotted = join(dir, 'snapshotted.qcow2');
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-F',
    'qcow2',
    '-b',
    made.chainBase,
    snapshotted,
  ]);
  const io = (...cmds: string[]) =>
    run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), snapshotted]);
  await io('write -z 0 64k', 'write -P 0x5a 1M 128k', 'write -z -u 1M 64k');
  await run('qemu-img', ['snapshot', '-c', 'snap', snapshotted]);
  await io('write -z 2M 128k', 'write -P 0x5b 1M 64k');
  src = { ...made, snapshotted };
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const norm = (text: string, path: string) =>
  text.replaceAll('qemu-img', 'vm-disk').replaceAll(path, 'IMAGE');

async function snapshotReadsSame(ours: string, theirs: string): Promise<void> {
  const list = (await qemuImg(['snapshot', '-l', theirs])).stdout;
  for (const name of list.includes(' snap ') ? ['snap'] : []) {
    const [a, b] = [`${ours}.snap.raw`, `${theirs}.snap.raw`];
    await run('qemu-img', ['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', ours, a]);
    await run('qemu-img', ['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', theirs, b]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  }
}

const IMAGES = ['qcow2v2', 'qcow2v3', 'compressed', 'chain', 'snapshotted'] as const;

describe('vm-disk amend', () => {
  describe.each(IMAGES)('%s', (kind) => {
    it.each([
      ['compat=0.10'],
      ['compat=1.1'],
      ['compat=v3,lazy_refcounts=on'],
      ['lazy_refcounts=on'],
      ['lazy_refcounts=off'],
      ['refcount_bits=64'],
      ['refcount_bits=1'],
      ['refcount_bits=8'],
      ['refcount_bits=16,compat=0.10'],
      ['compat=0.10,refcount_bits=8'],
      ['size=16M'],
      ['compat=2'],
      ['cluster_size=4k'],
      ['bogus=1'],
      ['lazy_refcounts=maybe'],
      ['refcount_bits=3'],
      ['refcount_bits=x'],
    ])('-o %s: as qemu-img', async (o) => {
      const base = join(dir, `${kind}-${o.replace(/\W+/g, '-')}`);
      const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
      copyFileSync(src[kind], ours);
      copyFileSync(src[kind], theirs);
      const a = await vmDisk(['amend', '-o', o, ours]);
      const b = await qemuImg(['amend', '-o', o, theirs]);
      expect({ code: a.code, stdout: a.stdout, stderr: norm(a.stderr, ours) }).toEqual({
        code: b.code,
        stdout: b.stdout,
        stderr: norm(b.stderr, theirs),
      });
      expect(await infoOf(ours)).toEqual(await infoOf(theirs));
      expect(await mapOf(ours)).toEqual(await mapOf(theirs));
      const check = await qemuImg(['check', ours]);
      expect(check.stdout).toContain('No errors were found on the image.');
      await run('qemu-img', ['compare', ours, theirs]);
      await snapshotReadsSame(ours, theirs);
    });
  });

  it.each([
    ['-p', ['-p', '-o', 'compat=0.10'], 'qcow2v3'],
    ['-p upgrading', ['-p', '-o', 'compat=1.1'], 'qcow2v2'],
    ['-p downgrading with a snapshot', ['-p', '-o', 'compat=0.10'], 'snapshotted'],
    ['-p refused', ['-p', '-o', 'lazy_refcounts=on'], 'qcow2v2'],
    ['-q -p', ['-q', '-p', '-o', 'compat=0.10'], 'qcow2v3'],
    ['two -o', ['-o', 'compat=1.1', '-o', 'lazy_refcounts=on'], 'qcow2v2'],
    ['--force', ['--force', '-o', 'compat=1.1'], 'qcow2v3'],
    ['no -o', [], 'qcow2v3'],
    ['-o help', ['-o', 'help'], 'qcow2v3'],
    ['-f raw', ['-f', 'raw', '-o', 'size=1M'], 'qcow2v3'],
    ['an unknown option', ['--frob', '-o', 'compat=1.1'], 'qcow2v3'],
  ] as const)('%s: as qemu-img', async (name, args, kind) => {
    const base = join(dir, `cli-${name.replace(/\W+/g, '-')}`);
    const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
    copyFileSync(src[kind], ours);
    copyFileSync(src[kind], theirs);
    const a = await vmDisk(['amend', ...args, ours]);
    const b = await qemuImg(['amend', ...args, theirs]);
    expect({ code: a.code, stdout: a.stdout, stderr: norm(a.stderr, ours) }).toEqual({
      code: b.code,
      stdout: b.stdout,
      stderr: norm(b.stderr, theirs),
    });
    expect(await infoOf(ours)).toEqual(await infoOf(theirs));
  });
});
