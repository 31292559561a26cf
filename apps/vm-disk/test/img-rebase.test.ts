// `vm-disk rebase` against `qemu-img rebase`: the same invocation on copies of the same
// chains (3-deep qcow2, overlays over raw, qcow2 v2/v3 and compressed images, a v2
// overlay): the same stdout (progress included) and exit status, and every file left
// alike (qemu-img compare, map, info, check).
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';
import { chainCopy, overlayOver, sameLayers } from './harness/img-chain.ts';

let dir: string;
let src: Sources;
let other: string;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-rebase-'));
  src = await makeSources(dir);
  // A raw image smaller than the chain, with data of its own and some of base's.
  other = join(dir, 'other.raw');
  writeFileSync(other, Buffer.alloc(5 << 20));
  await run('qemu-io', [
    '-f',
    'raw',
    '-c',
    'write -P 0x61 0 256k',
    '-c',
    'write -P 0x5a 2M 1M',
    other,
  ]);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const CHAIN = ['top.qcow2', 'mid.qcow2', 'base.qcow2', 'other.raw'];

describe('vm-disk rebase', () => {
  it.each([
    ['onto the base in the chain', ['-b', 'base.qcow2', '-F', 'qcow2']],
    ['onto the backing file itself', ['-b', 'mid.qcow2', '-F', 'qcow2']],
    ['onto an image outside the chain', ['-b', 'other.raw', '-F', 'raw']],
    ['onto an image outside the chain, -U', ['-U', '-b', 'other.raw', '-F', 'raw']],
    ['onto an absolute name', ['-b', '@/base.qcow2', '-F', 'qcow2']],
    ['flattened', ['-b', '']],
    ['-p, flattened', ['-p', '-b', '']],
    ['-p, onto an image outside the chain', ['-p', '-b', 'other.raw', '-F', 'raw']],
    ['-q -p', ['-q', '-p', '-b', '']],
    ['-u', ['-u', '-b', 'base.qcow2', '-F', 'qcow2']],
    ['-u without -b', ['-u']],
    ['-u without -F', ['-u', '-b', 'base.qcow2']],
    ['without -F', ['-b', 'base.qcow2']],
    ['-p without -F', ['-p', '-b', 'base.qcow2']],
    ['without -b or -u', []],
    ['onto a missing image', ['-b', 'nope.qcow2', '-F', 'qcow2']],
    ['-F frob', ['-b', 'base.qcow2', '-F', 'frob']],
    ['-t frob', ['-t', 'frob', '-b', '']],
    ['-T frob', ['-T', 'frob', '-b', '']],
    ['-t none -T none', ['-t', 'none', '-T', 'none', '-b', '']],
    ['-f qcow2', ['-f', 'qcow2', '-b', '']],
    ['an unknown option', ['--frob', '-b', '']],
  ])('a 3-deep chain, %s: as qemu-img', async (name, args) => {
    const tag = name.replace(/\W+/g, '-');
    const files = CHAIN.map((f) => (f === 'other.raw' ? other : join(dir, f)));
    const ours = chainCopy(dir, `${tag}.ours`, files);
    const theirs = chainCopy(dir, `${tag}.theirs`, files);
    const abs = (d: string) => args.map((a) => a.replace('@', d));
    const a = await vmDisk(['rebase', ...abs(ours), join(ours, 'top.qcow2')]);
    const b = await qemuImg(['rebase', ...abs(theirs), join(theirs, 'top.qcow2')]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    await sameLayers(ours, theirs, CHAIN);
  });

  it('no file name: as qemu-img', async () => {
    const a = await vmDisk(['rebase', '-b', '']);
    const b = await qemuImg(['rebase', '-b', '']);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
  });

  it.each([
    ['raw', '', ['-b', '']],
    ['qcow2v2', '', ['-b', '']],
    ['qcow2v3', 'compat=0.10', ['-b', '']],
    ['compressed', '', ['-b', '']],
    ['compressed', '', ['-b', 'other.raw', '-F', 'raw']],
    ['qcow2v3', '', ['-b', 'other.raw', '-F', 'raw']],
  ] as const)('an overlay over a %s image (%s), %j: as qemu-img', async (kind, options, args) => {
    const layer = async (d: string) => {
      copyFileSync(other, join(d, 'other.raw'));
      await overlayOver(d, src[kind], kind === 'raw' ? 'raw' : 'qcow2', options);
    };
    const tag = `${kind}${options}${args.join('')}`.replace(/\W+/g, '-');
    const ours = chainCopy(dir, `${tag}.ours`, []);
    const theirs = chainCopy(dir, `${tag}.theirs`, []);
    await layer(ours);
    await layer(theirs);
    const a = await vmDisk(['rebase', ...args, join(ours, 'overlay.qcow2')]);
    const b = await qemuImg(['rebase', ...args, join(theirs, 'overlay.qcow2')]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    await sameLayers(ours, theirs, ['overlay.qcow2', 'backing.img', 'other.raw']);
  });
});
