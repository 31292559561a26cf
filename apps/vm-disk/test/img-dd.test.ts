// `vm-disk dd` against `qemu-img dd`: the same exit status and stdout, and outputs that
// qemu-img describes and compares alike.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { infoOf, makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-dd-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('vm-disk dd', () => {
  it.each([
    ['the whole image', []],
    ['bs=64k count=4 skip=1', ['bs=64k', 'count=4', 'skip=1']],
    ['bs=3000 count=2', ['bs=3000', 'count=2']],
    ['skip=1000 (512-byte blocks)', ['skip=1000']],
    ['skip past the end', ['bs=1M', 'skip=100']],
    ['count past the end', ['bs=1M', 'count=100']],
    ['-O qcow2', ['-O', 'qcow2', 'bs=1M', 'skip=1']],
    ['bs=0', ['bs=0']],
    ['an unknown operand', ['foo=1']],
  ])('%s: as qemu-img', async (name, args) => {
    for (const kind of ['qcow2v3', 'chain', 'compressed'] as const) {
      const base = join(dir, `${kind}-${name.replace(/\W+/g, '-')}`);
      const a = await vmDisk(['dd', ...args, `if=${src[kind]}`, `of=${base}.ours`]);
      const b = await qemuImg(['dd', ...args, `if=${src[kind]}`, `of=${base}.theirs`]);
      expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
      expect(existsSync(`${base}.ours`)).toBe(existsSync(`${base}.theirs`));
      if (b.code === 0) {
        expect(await infoOf(`${base}.ours`)).toEqual(await infoOf(`${base}.theirs`));
        await run('qemu-img', ['compare', `${base}.ours`, `${base}.theirs`]);
      }
    }
  });

  it('refuses a missing if= or of= as qemu-img', async () => {
    const a = await vmDisk(['dd', `if=${src.raw}`]);
    const b = await qemuImg(['dd', `if=${src.raw}`]);
    expect(a.code).toBe(b.code);
  });
});
