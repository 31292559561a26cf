// `vm-disk bench` against `qemu-img bench`: the same invocation prints the same lines (the
// run time in qemu-img's format), exits alike, and -w leaves images that read the same.
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-bench-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const TIME = /^Run completed in \d+\.\d{3} seconds\.$/m;
const norm = (text: string, path: string) =>
  text
    .replace(TIME, 'Run completed in T seconds.')
    .replaceAll('qemu-img', 'vm-disk')
    .replaceAll(path, 'IMAGE');

describe('vm-disk bench', () => {
  describe.each(['raw', 'qcow2v3', 'compressed', 'chain'] as const)('%s', (kind) => {
    it.each([
      ['reads', ['-c', '300']],
      ['writes with a pattern', ['-w', '-c', '300', '-d', '8', '--pattern=0x5a']],
      [
        'writes, 64k, step 128k, from 1M',
        ['-w', '-c', '40', '-s', '64k', '-S', '128k', '-o', '1M'],
      ],
      ['writes with a flush every 16', ['-w', '-c', '100', '-d', '4', '--flush-interval=16']],
      ['--no-drain', ['-w', '-c', '100', '-d', '4', '--flush-interval=16', '--no-drain']],
      ['-t none -i io_uring', ['-c', '100', '-t', 'none', '-i', 'io_uring']],
      ['-n -t none', ['-c', '100', '-n', '-t', 'none']],
      ['-q', ['-q', '-c', '10']],
    ])('%s: as qemu-img', async (name, args) => {
      const base = join(dir, `${kind}-${name.replace(/\W+/g, '-')}`);
      const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
      copyFileSync(src[kind], ours);
      copyFileSync(src[kind], theirs);
      const format = kind === 'raw' ? ['-f', 'raw'] : [];
      const a = await vmDisk(['bench', ...format, ...args, ours]);
      const b = await qemuImg(['bench', ...format, ...args, theirs]);
      expect(b.stdout).toMatch(TIME);
      expect({ code: a.code, stdout: norm(a.stdout, ours), stderr: a.stderr }).toEqual({
        code: b.code,
        stdout: norm(b.stdout, theirs),
        stderr: b.stderr,
      });
      const f = kind === 'raw' ? ['-f', 'raw', '-F', 'raw'] : [];
      await run('qemu-img', ['compare', ...f, ours, theirs]);
      if (kind !== 'raw') {
        const c = await qemuImg(['check', ours]);
        expect(c.stdout).toContain('No errors were found on the image.');
      }
    });
  });

  it.each([
    ['-c x', ['-c', 'x']],
    ['-d x', ['-d', 'x']],
    ['-s x', ['-s', 'x']],
    ['-o x', ['-o', 'x']],
    ['-S x', ['-S', 'x']],
    ['--pattern=300', ['--pattern=300']],
    ['-i bogus', ['-i', 'bogus']],
    ['-t bogus', ['-t', 'bogus']],
    ['-n without -t none', ['-n']],
    ['a flush interval in a read test', ['--flush-interval=100']],
    ['a flush interval below the depth', ['-w', '--flush-interval=10']],
    ['a request past the end', ['-c', '10', '-s', '64k', '-o', '8M']],
    ['an unknown option', ['--frob']],
  ])('%s: as qemu-img', async (_name, args) => {
    const a = await vmDisk(['bench', ...args, src.qcow2v3]);
    const b = await qemuImg(['bench', ...args, src.qcow2v3]);
    expect({ code: a.code, stdout: norm(a.stdout, ''), stderr: norm(a.stderr, '') }).toEqual({
      code: b.code,
      stdout: norm(b.stdout, ''),
      stderr: norm(b.stderr, ''),
    });
  });
});
