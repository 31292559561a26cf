// `vm-disk info` and `vm-disk map` against qemu-img's: the same invocation on the same
// images (raw of many sizes, qcow2 v2/v3, compressed, extended L2, a 3-deep chain) gives
// the same stdout (JSON compared as data) and exit status: info's --backing-chain and
// full-backing-filename, map's host offsets and its human table.
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources & { extl2: string; extl2Overlay: string; zeroAlloc: string };
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-info-map-'));
  const s = await makeSources(dir);
  const extl2 = join(dir, 'extl2.qcow2');
  await run('qemu-img', ['convert', '-O', 'qcow2', '-o', 'extended_l2=on', s.qcow2v3, extl2]);
  await run('qemu-io', ['-c', 'write -P 7 100k 4k', '-c', 'write -z 640k 8k', extl2]);
  // Extended L2 over a backing file: the unallocated subclusters of an allocated cluster
  // read from below; and a v3 image whose allocated clusters were zeroed (ZERO_ALLOC).
  const extl2Overlay = join(dir, 'extl2-overlay.qcow2');
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    'extended_l2=on',
    '-F',
    'qcow2',
    '-b',
    s.chain,
    extl2Overlay,
  ]);
  await run('qemu-io', ['-c', 'write -P 9 1028k 4k', '-c', 'write -z 3076k 2k', extl2Overlay]);
  const zeroAlloc = join(dir, 'zero-alloc.qcow2');
  await run('qemu-img', ['convert', '-O', 'qcow2', s.qcow2v3, zeroAlloc]);
  await run('qemu-io', ['-c', 'write -z 64k 128k', '-c', 'write -z 1M 64k', zeroAlloc]);
  src = { ...s, extl2, extl2Overlay, zeroAlloc };
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function same(args: string[]): Promise<void> {
  const a = await vmDisk(args);
  const b = await qemuImg(args);
  expect(a.code, a.stderr).toBe(b.code);
  if (args.includes('--output=json') && b.code === 0)
    expect(JSON.parse(a.stdout)).toEqual(JSON.parse(b.stdout));
  else expect(a.stdout).toBe(b.stdout);
}

const KINDS = ['raw', 'qcow2v2', 'qcow2v3', 'compressed', 'chain', 'chainBase', 'extl2'] as const;

describe('vm-disk info', () => {
  describe.each(KINDS)('of a %s image', (kind) => {
    it.each([
      [],
      ['--output=json'],
      ['--backing-chain'],
      ['--backing-chain', '--output=json'],
      ['-U'],
      ['-f', 'raw'],
      ['-f', 'raw', '--output=json'],
    ])('%s: as qemu-img', async (...args) => {
      await same(['info', ...args, src[kind]]);
    });
  });

  it.each([
    0,
    512,
    1000,
    1024,
    4096,
    65536 + 512,
    90112,
    999 * 1024,
    1000 * 1024,
    1114112,
    123456789,
  ])('of a raw image of %d bytes: the sizes as qemu-img words them', async (size) => {
    const path = join(dir, `size-${size}.raw`);
    writeFileSync(path, '');
    truncateSync(path, size);
    await same(['info', path]);
  });

  it.each([
    ['an unknown option', ['--frob']],
    ['no file', []],
    ['two files', ['a', 'b']],
    ['a bad --output', ['--output=xml']],
    ['a missing file', ['missing.qcow2']],
    ['-f qcow2 on a raw image', ['-f', 'qcow2', '@raw']],
  ])('%s: the exit status of qemu-img', async (_name, args) => {
    const argv = args.map((x) => (x === '@raw' ? src.raw : x));
    const a = await vmDisk(['info', ...argv]);
    const b = await qemuImg(['info', ...argv]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
  });
});

// --image-opts: the image named by options, completed as qemu-img completes them (a file
// node under a filename, the format probed), or refused with its exit status.
const IMAGE_OPTS = [
  'driver=qcow2,file.filename=@chain',
  'driver=qcow2,file.driver=file,file.filename=@chain',
  'file.filename=@chain',
  'file.filename=@raw',
  'driver=raw,file.filename=@raw',
  '@chain',
  'foo=bar',
  'driver=qcow2',
  'driver=qcow2,file=@chain',
  'driver=qcow2,file.filename=@missing',
  'file.filename=@missing',
];
const opts = (text: string) =>
  text
    .replace('@chain', src.chain)
    .replace('@raw', src.raw)
    .replace('@missing', join(dir, 'missing.qcow2'));

describe.each([
  ['info'],
  ['info', '--output=json', '--backing-chain'],
  ['map', '--output=json'],
  ['map'],
  ['measure', '-O', 'qcow2'],
])('%s %s %s --image-opts', (...cmd) => {
  it.each(IMAGE_OPTS)('%s: as qemu-img', async (text) => {
    await same([...cmd, '--image-opts', opts(text)]);
  });
});

describe('vm-disk map', () => {
  // The host offsets of zero and unallocated (sub)clusters of allocated clusters too.
  describe.each([...KINDS, 'extl2Overlay', 'zeroAlloc'] as const)('of a %s image', (kind) => {
    it.each([
      [],
      ['--output=json'],
      ['-f', 'raw'],
      ['--output=json', '-f', 'raw'],
      ['--output=json', '--start-offset=1M', '--max-length=3M'],
      ['--start-offset=1M', '--max-length=3M'],
    ])('%s: as qemu-img', async (...args) => {
      await same(['map', ...args, src[kind]]);
    });
  });

  it('of a chain given by --image-opts: as qemu-img', async () => {
    await same(['map', '--image-opts', `driver=qcow2,file.driver=file,file.filename=${src.chain}`]);
  });

  it.each([
    ['an unknown option', ['--frob']],
    ['no file', []],
    ['a bad --output', ['--output=xml']],
  ])('%s: the exit status of qemu-img', async (_name, args) => {
    const a = await vmDisk(['map', ...args]);
    const b = await qemuImg(['map', ...args]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
  });
});
