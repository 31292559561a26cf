// `vm-disk bitmap` against `qemu-img bitmap`, and the other image subcommands on images
// that carry persistent bitmaps: the same invocation of both on copies of the same image
// gives the same messages and exit status, images qemu-img describes alike (bitmaps
// listed, not in use), the same dirty extents as qemu-nbd reads them, and qemu-img check
// clean. `vm-disk info` lists the bitmaps as qemu-img info does.
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type QemuImgBitmap, qemuDirtyExtents } from '@vmdisk/test-support';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { infoOf, type Outcome, outcome, qemuImg, vmDisk } from './harness/img.ts';

let dir: string;
const p = (name: string) => join(dir, name);
const io = (path: string, ...cmds: string[]) =>
  run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path]);

/**
 * bm.qcow2: b0 (auto, 64 KiB granules) dirty at 1M, 3M and 5M; b1 (4 KiB granules,
 * disabled) dirty at 3M only. other.qcow2: "ext" dirty at 6M. Made by qemu-img and qemu-io.
 */
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-bitmap-'));
  const create = (name: string, ...o: string[]) =>
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...o, p(name), '8M']);
  await create('bm.qcow2');
  await io(p('bm.qcow2'), 'write -P 1 0 64k');
  await run('qemu-img', ['bitmap', '--add', p('bm.qcow2'), 'b0']);
  await io(p('bm.qcow2'), 'write -P 2 1M 64k');
  await run('qemu-img', ['bitmap', '--add', '-g', '4k', p('bm.qcow2'), 'b1']);
  await io(p('bm.qcow2'), 'write -P 3 3M 8k');
  await run('qemu-img', ['bitmap', '--disable', p('bm.qcow2'), 'b1']);
  await io(p('bm.qcow2'), 'write -P 4 5M 4k');
  await create('other.qcow2');
  await run('qemu-img', ['bitmap', '--add', p('other.qcow2'), 'ext']);
  await io(p('other.qcow2'), 'write -P 5 6M 64k');
  // dirty.qcow2: lazy refcounts, left by a crash (qemu-io abort): dirty, its bitmap in use.
  await create('dirty.qcow2', '-o', 'lazy_refcounts=on');
  await run('qemu-img', ['bitmap', '--add', p('dirty.qcow2'), 'b0']);
  await outcome('qemu-io', ['-c', 'write -P 6 0 256k', '-c', 'abort', p('dirty.qcow2')]);
  await create('v2.qcow2', '-o', 'compat=0.10');
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('disk.raw'), '8M']);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const qemuDirty = qemuDirtyExtents;

function bitmapsOf(info: Record<string, unknown>): QemuImgBitmap[] {
  const fs = info['format-specific'] as { data: { bitmaps?: QemuImgBitmap[] } } | undefined;
  return fs?.data.bitmaps ?? [];
}

/** What a run says, with qemu-img's own names (its tool, node and file) made ours. */
function said(o: Outcome, ours: string, theirs: string) {
  const norm = (t: string) =>
    t
      // After rebuilding the refcounts QEMU frees the old reftable as leaks, one line each;
      // ours leaves none (the same count, "0 leaked clusters", in both reports).
      .replace(/^Repairing cluster \d+ refcount=1 reference=0\n/gm, '')
      .replaceAll('qemu-img', 'vm-disk')
      .replace(/#block\d+/g, 'image')
      .replaceAll(theirs, ours);
  return { code: o.code, stdout: norm(o.stdout), stderr: norm(o.stderr) };
}

/**
 * The same command on copies of `image` (the copy's name where `args` says FILE): the same
 * words, exit status, qemu-img info, dirty extents of every bitmap, qemu-img check clean.
 */
async function sameAsQemuImg(
  label: string,
  image: string,
  command: string,
  args: string[],
  checkClean = true,
) {
  const base = p(`${label.replace(/\W+/g, '-')}`);
  const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
  copyFileSync(p(image), ours);
  copyFileSync(p(image), theirs);
  const a = await vmDisk([command, ...args.map((x) => (x === 'FILE' ? ours : x))]);
  const b = await qemuImg([command, ...args.map((x) => (x === 'FILE' ? theirs : x))]);
  expect(said(a, ours, ours)).toEqual(said(b, ours, theirs));
  const info = await infoOf(ours);
  expect(info).toEqual(await infoOf(theirs));
  if (image.endsWith('.qcow2')) {
    // A bitmap in use has no bits to read (qemu-nbd refuses it).
    for (const { name } of bitmapsOf(info).filter((b) => !b.flags.includes('in-use')))
      expect(await qemuDirty(ours, name)).toEqual(await qemuDirty(theirs, name));
    if (checkClean) await run('qemu-img', ['check', ours]);
  }
  return a;
}

describe('vm-disk bitmap', () => {
  it.each([
    ['add', ['--add', 'FILE', 'new']],
    ['add with -g', ['--add', '-g', '4k', 'FILE', 'new']],
    ['add -g 6G (the low 32 bits: 2G)', ['-g', '6G', '--add', 'FILE', 'new']],
    ['add -g 4G (the low 32 bits: 0)', ['-g', '4G', '--add', 'FILE', 'new']],
    ['add -g 0 (the default)', ['--add', '-g', '0', 'FILE', 'new']],
    ['add a bad granularity', ['--add', '-g', '1000', 'FILE', 'new']],
    ['add an existing one', ['--add', 'FILE', 'b0']],
    ['add a name too long', ['--add', 'FILE', 'x'.repeat(1100)]],
    ['remove', ['--remove', 'FILE', 'b0']],
    ['remove a missing one', ['--remove', 'FILE', 'nope']],
    ['clear', ['--clear', 'FILE', 'b0']],
    ['disable', ['--disable', 'FILE', 'b0']],
    ['enable', ['--enable', 'FILE', 'b1']],
    ['merge from the image', ['--merge', 'b1', 'FILE', 'b0']],
    ['merge a missing source', ['--merge', 'nope', 'FILE', 'b0']],
    ['merge into a missing one', ['--merge', 'b0', 'FILE', 'nope']],
    ['merge from another file', ['--merge', 'ext', '-b', 'OTHER', '-F', 'qcow2', 'FILE', 'b1']],
    ['several in order', ['--add', '-g', '8k', '--merge', 'b0', '--disable', 'FILE', 'new']],
    ['remove then add', ['--remove', '--add', 'FILE', 'b0']],
    ['clear then merge', ['--clear', '--merge', 'b1', 'FILE', 'b0']],
    ['done up to the failing one', ['--add', '--add', '--clear', 'FILE', 'new']],
    ['no operation', ['FILE', 'b0']],
    ['-g without --add', ['-g', '4k', '--clear', 'FILE', 'b0']],
    ['a bad -g', ['-g', 'abc', '--add', 'FILE', 'b0']],
    ['-F without -b', ['-F', 'qcow2', '--merge', 'b1', 'FILE', 'b0']],
    ['-b without --merge', ['-b', 'OTHER', '--clear', 'FILE', 'b0']],
    ['no bitmap name', ['--clear', 'FILE']],
    ['one name too many', ['--clear', 'FILE', 'b0', 'b1']],
    ['an unknown option', ['--frob', 'FILE', 'b0']],
    ['a missing option argument', ['--clear', 'FILE', 'b0', '--merge']],
    ['a missing source file', ['--merge', 'ext', '-b', 'NOFILE', 'FILE', 'b0']],
  ])('%s: as qemu-img', async (label, args) => {
    const files: Record<string, string> = {
      OTHER: p('other.qcow2'),
      NOFILE: p('nofile.qcow2'),
    };
    const resolved = args.map((x) => files[x] ?? x);
    await sameAsQemuImg(`bitmap ${label}`, 'bm.qcow2', 'bitmap', resolved);
  });

  it('--image-opts: as qemu-img', async () => {
    // The file name sits inside the options: each tool gets its own copy's.
    const [ours, theirs] = [p('image-opts.ours'), p('image-opts.theirs')];
    copyFileSync(p('bm.qcow2'), ours);
    copyFileSync(p('bm.qcow2'), theirs);
    const opts = (f: string) => `driver=qcow2,file.driver=file,file.filename=${f}`;
    const a = await vmDisk(['bitmap', '--add', '--image-opts', opts(ours), 'new']);
    const b = await qemuImg(['bitmap', '--add', '--image-opts', opts(theirs), 'new']);
    expect(a).toEqual(b);
    expect(await infoOf(ours)).toEqual(await infoOf(theirs));
    expect(bitmapsOf(await infoOf(ours)).map((x) => x.name)).toEqual(['b0', 'b1', 'new']);
  });

  it.each([
    ['a qcow2 v2 image', 'v2.qcow2', ['--add', 'FILE', 'b']],
    ['a raw image', 'disk.raw', ['-f', 'raw', '--add', 'FILE', 'b']],
  ])('refuses to store a bitmap in %s, as qemu-img', async (label, image, args) => {
    const a = await sameAsQemuImg(`bitmap ${label}`, image, 'bitmap', args);
    expect(a.code).toBe(1);
  });
});

describe('image subcommands keep the bitmaps of the images they write', () => {
  it.each([
    ['resize grown', 'resize', ['FILE', '16M']],
    ['resize shrunk', 'resize', ['--shrink', 'FILE', '4M']],
    ['check -r all', 'check', ['-r', 'all', 'FILE']],
    ['check -r leaks', 'check', ['-r', 'leaks', 'FILE']],
    ['convert -n into it', 'convert', ['-n', '-O', 'qcow2', 'OTHER', 'FILE']],
  ])('%s: bitmaps as qemu-img leaves them', async (label, command, args) => {
    const resolved = args.map((x) => (x === 'OTHER' ? p('other.qcow2') : x));
    const a = await sameAsQemuImg(label, 'bm.qcow2', command, resolved);
    expect(a.code).toBe(0);
    const ours = p(`${label.replace(/\W+/g, '-')}.ours`);
    expect(bitmapsOf(await infoOf(ours)).map((b) => b.name)).toEqual(['b0', 'b1']);
  });

  it.each([
    ['check -r all', ['-r', 'all', 'FILE']],
    ['check -r leaks', ['-r', 'leaks', 'FILE']],
  ])(
    '%s of a crashed image: marked clean, its bitmap still in use, as qemu-img',
    async (label, args) => {
      // -r leaks cannot repair it: the refcounts stay wrong, in QEMU's copy too.
      await sameAsQemuImg(`dirty ${label}`, 'dirty.qcow2', 'check', args, args[1] === 'all');
      const info = await infoOf(p(`dirty-${label.replace(/\W+/g, '-')}.ours`));
      expect(bitmapsOf(info)).toEqual([
        { flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 },
      ]);
      // Marked clean even so (QEMU's close of the image marks it clean).
      expect(info['dirty-flag']).toBe(false);
    },
  );
});

describe('vm-disk info lists the bitmaps', () => {
  it.each([
    ['auto and disabled ones', 'bm.qcow2'],
    ['none', 'v2.qcow2'],
    ['one in use', 'dirty.qcow2'],
  ])('%s, as qemu-img info (human and JSON)', async (_label, image) => {
    const path = p(image);
    const human = (o: Outcome) => o.stdout.replace(/^disk size: .*\n/m, '');
    expect(human(await vmDisk(['info', path]))).toBe(human(await qemuImg(['info', path])));
    // Word for word, but for the file's size on disk.
    const json = async (o: Promise<Outcome>) =>
      (await o).stdout.replace(/^ *"actual-size": \d+,\n/m, '');
    expect(await json(vmDisk(['info', '--output=json', path]))).toBe(
      await json(qemuImg(['info', '--output=json', path])),
    );
  });
});
