// `vm-disk compare` against `qemu-img compare`: the same stdout and exit status for the
// same two images (equal, different, of different sizes, strict, unopenable).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
const p = (name: string) => join(dir, name);
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-compare-'));
  src = await makeSources(dir);
  // A flattened chain; a copy with one sector changed; larger copies, zero and not past
  // the end; an image whose zeros are a zero cluster rather than unallocated.
  await run('qemu-img', ['convert', '-O', 'qcow2', src.chain, p('flat.qcow2')]);
  await run('qemu-img', ['convert', '-O', 'qcow2', src.qcow2v3, p('changed.qcow2')]);
  await run('qemu-io', ['-c', 'write -P 0x99 5200k 512', p('changed.qcow2')]);
  await run('qemu-img', ['convert', '-O', 'raw', src.qcow2v3, p('big.raw')]);
  await run('qemu-img', ['resize', '-q', '-f', 'raw', p('big.raw'), '12M']);
  await run('qemu-img', ['convert', '-O', 'raw', p('big.raw'), p('bigdata.raw')]);
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 10M 4k', p('bigdata.raw')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('zeroed.qcow2'), '8M']);
  await run('qemu-io', ['-c', 'write -z 0 8M', p('zeroed.qcow2')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('empty.qcow2'), '8M']);
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('empty.raw'), '8M']);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const CASES: Array<[string, () => string[]]> = [
  ['raw and qcow2 of the same data', () => [src.raw, src.qcow2v3]],
  ['qcow2 v2 and compressed', () => [src.qcow2v2, src.compressed]],
  ['a chain and its flattened copy', () => [src.chain, p('flat.qcow2')]],
  ['one sector changed', () => [src.qcow2v3, p('changed.qcow2')]],
  ['one sector changed, -p', () => ['-p', src.qcow2v3, p('changed.qcow2')]],
  ['a chain and its base', () => [src.chain, src.chainBase]],
  ['larger, zeros past the end', () => [src.qcow2v3, p('big.raw')]],
  ['larger, data past the end', () => [p('bigdata.raw'), src.raw]],
  ['strict: sizes differ', () => ['-s', src.qcow2v3, p('big.raw')]],
  ['strict: allocation differs', () => ['-s', src.qcow2v3, src.raw]],
  ['strict: the same image', () => ['-s', src.qcow2v3, src.qcow2v3]],
  ['strict: zero cluster and unallocated', () => ['-s', p('zeroed.qcow2'), p('empty.qcow2')]],
  ['zero cluster and a raw hole', () => [p('zeroed.qcow2'), p('empty.raw')]],
  ['-f and -F given', () => ['-f', 'raw', '-F', 'qcow2', src.raw, src.qcow2v3]],
  ['-f wrong', () => ['-f', 'qcow2', src.raw, src.qcow2v3]],
  ['a missing image', () => [src.raw, p('missing.qcow2')]],
  ['one image only', () => [src.raw]],
  ['-q', () => ['-q', src.qcow2v3, p('changed.qcow2')]],
  ['-U', () => ['-U', src.qcow2v3, src.qcow2v3]],
];

describe('vm-disk compare', () => {
  it.each(CASES)('%s: the same stdout and exit status as qemu-img', async (_name, args) => {
    const a = await vmDisk(['compare', ...args()]);
    const b = await qemuImg(['compare', ...args()]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    expect(a.stderr === '').toBe(b.stderr === '');
  });
});
