// `vm-disk measure` against `qemu-img measure`: the same invocation (a size, or a source
// image: raw, qcow2 v2/v3, compressed, a 3-deep chain, extended L2) gives the same stdout
// (JSON compared as data) and exit status.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources & { extl2: string };
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-measure-'));
  const s = await makeSources(dir);
  const extl2 = join(dir, 'extl2.qcow2');
  await run('qemu-img', ['convert', '-O', 'qcow2', '-o', 'extended_l2=on', s.qcow2v3, extl2]);
  src = { ...s, extl2 };
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function same(args: string[]): Promise<void> {
  const a = await vmDisk(['measure', ...args]);
  const b = await qemuImg(['measure', ...args]);
  expect(a.code).toBe(b.code);
  if (args.includes('--output=json') && b.code === 0)
    expect(JSON.parse(a.stdout)).toEqual(JSON.parse(b.stdout));
  else expect(a.stdout).toBe(b.stdout);
  expect(a.stderr.replaceAll('vm-disk: ', '')).toBe(b.stderr.replaceAll('qemu-img: ', ''));
}

const TARGETS: string[][] = [
  [],
  ['-O', 'raw'],
  ['-O', 'qcow2'],
  ['-O', 'qcow2', '--output=json'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k'],
  ['-O', 'qcow2', '-o', 'cluster_size=2M,extended_l2=on'],
  ['-O', 'qcow2', '-o', 'compat=0.10'],
  ['-O', 'qcow2', '-o', 'refcount_bits=1', '-o', 'preallocation=metadata'],
  ['-O', 'qcow2', '-o', 'preallocation=full'],
  ['-O', 'qcow2', '-o', 'backing_file=x.qcow2'],
];

describe('vm-disk measure', () => {
  describe.each(['raw', 'qcow2v2', 'qcow2v3', 'compressed', 'chain', 'extl2'] as const)(
    'of a %s image',
    (kind) => {
      it.each(TARGETS.map((t) => [t.join(' ') || 'no options', t] as const))(
        '%s: as qemu-img',
        async (_name, target) => {
          await same([...target, src[kind]]);
        },
      );
    },
  );

  it.each(
    [
      ['--size', '1G'],
      ['--size', '1000', '-O', 'raw'],
      ['--size', '1G', '-O', 'qcow2'],
      ['--size', '1G', '-O', 'qcow2', '--output=json'],
      ['--size', '100M', '-O', 'qcow2', '-o', 'cluster_size=4k,preallocation=full'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=on'],
      ['--size', '1T', '-O', 'qcow2', '-o', 'cluster_size=512'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'frob=1'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=3k'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=abc'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=x'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'compat=2'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=3'],
      ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=x'],
      ['--size', '1G', '-O', 'raw', '-o', 'cluster_size=4k'],
      ['--size', '1G', '-O', 'vmdk'],
      ['--size', '1G', '-O', 'frob'],
      ['--size', '1G', '--output=frob'],
      ['--size', '1x'],
      ['-O', 'qcow2', '-o', 'size=1G'],
      [],
    ].map((a) => [a.join(' ') || 'no arguments', a] as const),
  )('%s: as qemu-img', async (_name, args) => {
    await same(args);
  });

  it('--size with a file name: as qemu-img', async () => {
    await same(['--size', '1G', src.qcow2v3]);
  });

  it('an unknown option: the exit status of qemu-img (its help, status 0)', async () => {
    const a = await vmDisk(['measure', '-s', '1G']);
    const b = await qemuImg(['measure', '-s', '1G']);
    expect(a.code).toBe(b.code);
    expect(a.stdout).toContain('vm-disk measure');
  });
});
