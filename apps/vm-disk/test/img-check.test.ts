// `vm-disk check` against `qemu-img check`: the same stdout (JSON as data), exit status and
// repaired images, on clean images and on copies of a qemu-img image damaged by editing its
// bytes (leaks, refcounts too low or zero, COPIED flags wrong in L1 and L2 entries).
import {
  closeSync,
  copyFileSync,
  fstatSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, outcome, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
const p = (name: string) => join(dir, name);

/** The places of an image the damages edit, read from its header and tables. */
function layout(path: string) {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    readSync(fd, buf, 0, buf.length, 0);
    const clusterSize = 2 ** buf.readUInt32BE(20);
    const l1 = Number(buf.readBigUInt64BE(40));
    const refTable = Number(buf.readBigUInt64BE(48));
    const refBlock = Number(buf.readBigUInt64BE(refTable));
    const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    // The first data cluster the L2 table maps.
    let entry = 0;
    while (buf.readBigUInt64BE(l2 + entry * 8) === 0n) entry++;
    const data = Number(buf.readBigUInt64BE(l2 + entry * 8) & 0x00fffffffffffe00n);
    return { clusterSize, l1, refBlock, l2, entry, data };
  } finally {
    closeSync(fd);
  }
}

type Damage = (path: string) => void;

function edit(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}
const u16 = (v: number) => Buffer.from([v >> 8, v & 0xff]);
const u64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};

const DAMAGES: Array<[string, Damage]> = [
  [
    'a leaked cluster past the data',
    (path) => {
      const l = layout(path);
      const fd = openSync(path, 'r+');
      const clusters = Math.ceil(fstatSync(fd).size / l.clusterSize);
      ftruncateSync(fd, (clusters + 1) * l.clusterSize);
      closeSync(fd);
      edit(path, l.refBlock + 2 * clusters, u16(1));
    },
  ],
  [
    'a data cluster counted twice',
    (path) => {
      const l = layout(path);
      edit(path, l.refBlock + 2 * (l.data / l.clusterSize), u16(2));
    },
  ],
  [
    'a data cluster counted zero times',
    (path) => {
      const l = layout(path);
      edit(path, l.refBlock + 2 * (l.data / l.clusterSize), u16(0));
    },
  ],
  [
    'an L2 table counted zero times',
    (path) => {
      const l = layout(path);
      edit(path, l.refBlock + 2 * (l.l2 / l.clusterSize), u16(0));
    },
  ],
  [
    'an L2 entry without COPIED',
    (path) => {
      const l = layout(path);
      edit(path, l.l2 + 8 * l.entry, u64(BigInt(l.data)));
    },
  ],
  [
    'an L1 entry without COPIED',
    (path) => {
      const l = layout(path);
      edit(path, l.l1, u64(BigInt(l.l2)));
    },
  ],
];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-check-'));
  src = await makeSources(dir);
  // Clusters written out of order: fragmented.
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('fragmented.qcow2'), '4M']);
  await run('qemu-io', [
    ...['-c', 'write -P 1 3M 64k', '-c', 'write -P 2 0 64k', '-c', 'write -P 3 1M 128k'],
    p('fragmented.qcow2'),
  ]);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Both tools' check of their own copy of `path` with `args`; compared. */
async function same(path: string, args: string[], name: string): Promise<[string, string]> {
  const ours = p(`${name}.ours`);
  const theirs = p(`${name}.theirs`);
  copyFileSync(path, ours);
  copyFileSync(path, theirs);
  const a = await vmDisk(['check', ...args, ours]);
  const b = await qemuImg(['check', ...args, theirs]);
  expect(a.code, a.stderr).toBe(b.code);
  if (args.includes('--output=json') && b.stdout) {
    expect(JSON.parse(a.stdout)).toEqual({ ...JSON.parse(b.stdout), filename: ours });
  } else {
    expect(a.stdout).toBe(b.stdout);
  }
  expect(a.stderr === '').toBe(b.stderr === '');
  return [ours, theirs];
}

describe('vm-disk check', () => {
  it.each([
    ['qcow2 v3', () => src.qcow2v3],
    ['qcow2 v2', () => src.qcow2v2],
    ['compressed', () => src.compressed],
    ['the top of a chain', () => src.chain],
    ['fragmented', () => p('fragmented.qcow2')],
    ['raw (no checks)', () => src.raw],
  ])('%s: as qemu-img says', async (name, path) => {
    for (const output of ['--output=human', '--output=json']) {
      await same(path(), [output], `clean-${name.replace(/\W+/g, '-')}`);
    }
  });

  describe.each(DAMAGES)('%s', (name, damage) => {
    const base = name.replace(/\W+/g, '-');
    it.each([[[]], [['-r', 'leaks']], [['-r', 'all']]])(
      'check %j: the same findings, exit status and repaired image',
      async (repair) => {
        for (const [v, image] of [
          ['v3', src.qcow2v3],
          ['v2', src.qcow2v2],
        ] as const) {
          const damaged = p(`${base}-${v}.qcow2`);
          copyFileSync(image, damaged);
          damage(damaged);
          for (const output of ['--output=human', '--output=json']) {
            const [ours, theirs] = await same(
              damaged,
              [...repair, output],
              `${base}-${v}-${repair.join('')}${output.slice(9)}`,
            );
            // What qemu-img check says of each afterwards, and the data.
            const after = [
              await outcome('qemu-img', ['check', ours]),
              await outcome('qemu-img', ['check', theirs]),
            ];
            expect(after[0]!.code).toBe(after[1]!.code);
            expect(after[0]!.stdout).toBe(after[1]!.stdout);
            if (after[1]!.code === 0) await run('qemu-img', ['compare', ours, theirs]);
          }
        }
      },
    );
  });

  it.each([
    ['-r bogus', ['-r', 'bogus']],
    ['--output=xml', ['--output=xml']],
    ['no image', []],
  ])('refuses %s with qemu-img exit status', async (_name, args) => {
    const image = args.length ? [src.qcow2v3] : [];
    const a = await vmDisk(['check', ...args, ...image]);
    const b = await qemuImg(['check', ...args, ...image]);
    expect(a.code).toBe(b.code);
    expect(a.stdout).toBe(b.stdout);
  });
});
