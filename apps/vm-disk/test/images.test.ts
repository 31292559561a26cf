// `vm-disk create | info | map` against qemu-img: images we make pass `qemu-img check`
// and read the same in `qemu-img info`; our info and map say what qemu-img says.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CLI, run, start } from './harness/daemon.ts';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-images-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const vmDisk = (...args: string[]) => run(process.execPath, [CLI, ...args]);
const qemuInfo = async (path: string) =>
  JSON.parse(await run('qemu-img', ['info', '--output=json', path]));
/** qemu-img map's entries without `compressed` (QEMU 8 has it, vm-disk prints 7.2's). */
const withoutCompressed = (entries: Record<string, unknown>[]) =>
  entries.map(({ compressed: _c, ...rest }) => rest);

describe('vm-disk create', () => {
  it.each([
    ['qcow2 v3 defaults', ['-f', 'qcow2'], '64M'],
    [
      'qcow2 v2 (compat 0.10) 512 B clusters',
      ['-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512'],
      '8M',
    ],
    [
      'qcow2 lazy refcounts, extended L2, 2 MiB clusters',
      ['-f', 'qcow2', '-o', 'lazy_refcounts=on,extended_l2=on,cluster_size=2M'],
      '1G',
    ],
    ['qcow2 metadata preallocation', ['-f', 'qcow2', '-o', 'preallocation=metadata'], '32M'],
    [
      'qcow2 full preallocation, 8-bit refcounts',
      ['-f', 'qcow2', '-o', 'preallocation=full,refcount_bits=8'],
      '8M',
    ],
    ['raw', ['-f', 'raw'], '10M'],
    ['raw, full preallocation', ['-f', 'raw', '-o', 'preallocation=full'], '4M'],
  ])('%s: qemu-img check is clean and info shows the options', async (_name, args, size) => {
    const path = join(dir, 'image');
    await vmDisk('create', '-q', ...args, path, size);
    const format = args[1] as string;
    if (format === 'qcow2') await run('qemu-img', ['check', '-f', 'qcow2', path]);
    const theirs = await qemuInfo(path);
    expect(theirs.format).toBe(format);
    const ours = JSON.parse(await vmDisk('info', '--output=json', path));
    for (const key of [
      'virtual-size',
      'format',
      'cluster-size',
      'format-specific',
      'backing-filename',
      'dirty-flag',
    ]) {
      expect(ours[key], key).toEqual(theirs[key]);
    }
    const o = (args[3] ?? '').split(',').filter(Boolean);
    const data = theirs['format-specific']?.data ?? {};
    if (o.includes('compat=0.10')) expect(data.compat).toBe('0.10');
    if (o.includes('lazy_refcounts=on')) expect(data['lazy-refcounts']).toBe(true);
    if (o.includes('extended_l2=on')) expect(data['extended-l2']).toBe(true);
    if (o.includes('refcount_bits=8')) expect(data['refcount-bits']).toBe(8);
  });

  it('makes an overlay on a backing file, sized from it, that qemu-img reads through', async () => {
    const base = join(dir, 'base.raw');
    const overlay = join(dir, 'overlay.qcow2');
    await vmDisk('create', '-q', '-f', 'raw', base, '16M');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 1M', base]);
    await vmDisk('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay);
    const info = await qemuInfo(overlay);
    expect(info['virtual-size']).toBe(16 << 20);
    expect(info['backing-filename']).toBe(base);
    expect(info['backing-filename-format']).toBe('raw');
    await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x61 0 1M', overlay]);
  });

  it('shows preallocation progress', async () => {
    const p = start(process.execPath, [
      CLI,
      'create',
      '-f',
      'raw',
      '-o',
      'preallocation=full',
      join(dir, 'p.raw'),
      '8M',
    ]);
    expect(await p.exited).toBe(0);
    expect(p.stderr()).toMatch(/preallocating .*100%/);
  });

  it.each([
    [['-f', 'vmdk', 'x', '1M'], '-f'],
    [['-f', 'qcow2', '-o', 'colour=red', 'x', '1M'], '-o'],
    [['-f', 'qcow2', '-o', 'lazy_refcounts=maybe', 'x', '1M'], '-o'],
    [['-f', 'raw', 'x', 'huge'], 'SIZE'],
    [['-f', 'raw', 'x'], 'create'],
  ])('refuses %j with status 1 (as qemu-img), naming %s', async (args, option) => {
    const p = start(process.execPath, [
      CLI,
      'create',
      ...args.map((a) => (a === 'x' ? join(dir, 'x') : a)),
    ]);
    expect(await p.exited).toBe(1);
    expect(p.stderr()).toContain(option);
  });
});

describe('vm-disk map and info', () => {
  it('map of a three-image chain with zero clusters equals qemu-img map', async () => {
    const base = join(dir, 'base.raw');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    await run('qemu-img', ['create', '-f', 'raw', base, '16M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 8M 512k', base]);
    await run('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'raw', mid]);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 3 512k 1M',
      '-c',
      'write -z 12M 256k',
      mid,
    ]);
    await run('qemu-img', [
      'create',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=4096',
      '-b',
      mid,
      '-F',
      'qcow2',
      top,
    ]);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 4 4100 10000',
      '-c',
      'write -z 8M 64k',
      '-c',
      'discard 12M 64k',
      top,
    ]);
    const ours = JSON.parse(await vmDisk('map', '--output=json', top));
    const theirs = JSON.parse(await run('qemu-img', ['map', '--output=json', top]));
    expect(ours).toEqual(withoutCompressed(theirs));
    expect(await vmDisk('map', top)).toBe(await run('qemu-img', ['map', top]));
  });

  it('map of a sparse raw file equals qemu-img map', async () => {
    const path = join(dir, 'sparse.raw');
    await run('qemu-img', ['create', '-f', 'raw', path, '32M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 4M 1M', '-c', 'write -P 9 20M 64k', path]);
    const ours = JSON.parse(await vmDisk('map', '--output=json', path));
    const theirs = JSON.parse(await run('qemu-img', ['map', '--output=json', path]));
    expect(ours).toEqual(withoutCompressed(theirs));
  });

  it('info of a compressed image and a bochs-free raw file say what qemu-img says', async () => {
    const raw = join(dir, 'src.raw');
    const compressed = join(dir, 'c.qcow2');
    await run('qemu-img', ['create', '-f', 'raw', raw, '4M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 2M', raw]);
    await run('qemu-img', ['convert', '-c', '-O', 'qcow2', raw, compressed]);
    for (const path of [raw, compressed]) {
      const ours = JSON.parse(await vmDisk('info', '--output=json', path));
      const theirs = await qemuInfo(path);
      for (const key of ['virtual-size', 'format', 'cluster-size', 'format-specific'])
        expect(ours[key], key).toEqual(theirs[key]);
    }
  });

  it('refuses a file that is not there, with status 1 and the file named', async () => {
    const p = start(process.execPath, [CLI, 'info', join(dir, 'absent.qcow2')]);
    expect(await p.exited).toBe(1);
    expect(p.stderr()).toContain('absent.qcow2');
  });
});
