// `vm-disk commit` against `qemu-img commit`: the same invocation on copies of the same
// chains (3-deep qcow2, and overlays over raw, qcow2 v2/v3 and compressed images): the
// same stdout and exit status, and every layer left alike (qemu-img compare, map, info,
// check).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';
import { chainCopy, collapseProgress, overlayOver, sameLayers } from './harness/img-chain.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-commit-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** -p output without the values between 0 and 100 (how many are drawn varies). */
const progressOf = (s: string) =>
  collapseProgress(s).replace(/^( {4}\(0\.00\/100%\)\r).*?( {4}\(100\.00\/100%\)\r)/s, '$1$2');

const CHAIN = ['top.qcow2', 'mid.qcow2', 'base.qcow2'];

describe('vm-disk commit', () => {
  const chainFiles = () => CHAIN.map((f) => join(dir, f));
  it.each([
    ['into the backing file', []],
    ['-d', ['-d']],
    ['-b the base (implies -d)', ['-b', 'base.qcow2']],
    ['-b the backing file', ['-b', 'mid.qcow2']],
    ['-b an absolute name', ['-b', '@/base.qcow2']],
    ['-b not in the chain', ['-b', 'nope.qcow2']],
    ['-q', ['-q']],
    ['-r', ['-r', '1G']],
    ['-r bad', ['-r', '1x']],
    ['-t none', ['-t', 'none']],
    ['-t bad', ['-t', 'frob']],
    ['-f qcow2', ['-f', 'qcow2']],
    ['-p', ['-p']],
    ['an unknown option', ['--frob']],
  ])('a 3-deep chain, %s: as qemu-img', async (name, args) => {
    const tag = name.replace(/\W+/g, '-');
    const ours = chainCopy(dir, `${tag}.ours`, chainFiles());
    const theirs = chainCopy(dir, `${tag}.theirs`, chainFiles());
    const abs = (d: string) => args.map((a) => a.replace('@', d));
    const a = await vmDisk(['commit', ...abs(ours), join(ours, 'top.qcow2')]);
    const b = await qemuImg(['commit', ...abs(theirs), join(theirs, 'top.qcow2')]);
    expect({ code: a.code, stdout: progressOf(a.stdout) }).toEqual({
      code: b.code,
      stdout: progressOf(b.stdout),
    });
    await sameLayers(ours, theirs, CHAIN);
  });

  it.each([
    ['an image without a backing file', 'base.qcow2'],
    ['a missing image', 'missing.qcow2'],
  ])('%s: as qemu-img', async (_name, file) => {
    const ours = chainCopy(dir, 'alone.ours', chainFiles());
    const a = await vmDisk(['commit', join(ours, file)]);
    const b = await qemuImg(['commit', join(ours, file)]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    if (file === 'base.qcow2')
      expect(a.stderr.replace('vm-disk:', '')).toBe(b.stderr.replace('qemu-img:', ''));
  });

  it('no file name: as qemu-img', async () => {
    const a = await vmDisk(['commit']);
    const b = await qemuImg(['commit']);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
  });

  it.each([
    ['raw', ''],
    ['qcow2v2', ''],
    ['qcow2v3', ''],
    ['compressed', ''],
    ['qcow2v3', 'compat=0.10'],
  ] as const)('an overlay over a %s image (%s): as qemu-img', async (kind, options) => {
    const layer = (d: string) =>
      overlayOver(d, src[kind], kind === 'raw' ? 'raw' : 'qcow2', options);
    const ours = chainCopy(dir, `${kind}${options}-overlay.ours`, []);
    const theirs = chainCopy(dir, `${kind}${options}-overlay.theirs`, []);
    await layer(ours);
    await layer(theirs);
    const a = await vmDisk(['commit', join(ours, 'overlay.qcow2')]);
    const b = await qemuImg(['commit', join(theirs, 'overlay.qcow2')]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    await sameLayers(ours, theirs, ['overlay.qcow2', 'backing.img']);
  });
});
