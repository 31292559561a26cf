// `vm-disk resize` against `qemu-img resize`: the same stdout and exit status on copies of
// the same images, and images qemu-img then describes and compares alike.
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { infoOf, makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-resize-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const IMAGES = ['raw', 'qcow2v2', 'qcow2v3', 'compressed', 'chain'] as const;

describe('vm-disk resize', () => {
  describe.each(IMAGES)('%s', (kind) => {
    it.each([
      ['grown by +3M', ['+3M']],
      ['grown to 16M', ['16M']],
      ['shrunk by -1M with --shrink', ['--shrink', '-1M']],
      ['shrunk to 4M with --shrink', ['--shrink', '4M']],
      ['shrunk without --shrink', ['4M']],
      ['to zero', ['--shrink', '0']],
      ['to a bad size', ['12Q']],
      ['-q', ['-q', '+1M']],
    ])('%s: as qemu-img', async (name, args) => {
      const base = join(dir, `${kind}-${name.replace(/\W+/g, '-')}`);
      const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
      copyFileSync(src[kind], ours);
      copyFileSync(src[kind], theirs);
      const format = kind === 'raw' ? ['-f', 'raw'] : [];
      const opts = args.slice(0, -1);
      const size = args.at(-1)!;
      const a = await vmDisk(['resize', ...format, ...opts, ours, size]);
      const b = await qemuImg(['resize', ...format, ...opts, theirs, size]);
      expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
      expect(await infoOf(ours)).toEqual(await infoOf(theirs));
      await run('qemu-img', [
        'compare',
        ...format,
        ...format.map((f) => (f === '-f' ? '-F' : f)),
        ours,
        theirs,
      ]);
      if (kind !== 'raw') await run('qemu-img', ['check', ours]);
    });
  });
});
