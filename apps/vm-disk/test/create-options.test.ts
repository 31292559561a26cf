// `vm-disk create` with options it must refuse: every option is checked before anything is
// created, so a refused create leaves no file behind and an existing file as it was; the
// messages are qemu-img's. A create that fails later removes the file it made, never one
// that was there before.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CLI, run, start } from './harness/daemon.ts';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-create-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

async function exits(command: string, args: string[]): Promise<{ code: unknown; stderr: string }> {
  const p = start(command, args);
  const code = await p.exited;
  return { code, stderr: p.stderr() };
}

/** `vm-disk create ARGS`: how it exited and what it said. */
const create = (...args: string[]) => exits(process.execPath, [CLI, 'create', ...args]);

describe('vm-disk create refuses bad options before creating anything', () => {
  it.each([
    ['cluster_size=3k', '1G'],
    ['cluster_size=256', '1G'],
    ['cluster_size=4M', '1G'],
    ['cluster_size=abc', '1G'],
    ['refcount_bits=3', '1G'],
    ['refcount_bits=128', '1G'],
    ['refcount_bits=abc', '1G'],
    ['compat=0.9', '1G'],
    ['lazy_refcounts=maybe', '1G'],
    ['preallocation=bogus', '1G'],
    ['compression_type=lz4', '1G'],
    ['compat=0.10,refcount_bits=8', '1G'],
    ['compat=0.10,lazy_refcounts=on', '1G'],
    ['compat=0.10,extended_l2=on', '1G'],
    ['compat=0.10,compression_type=zstd', '1G'],
    ['extended_l2=on,cluster_size=4k', '1G'],
    ['backing_fmt=raw', '1G'],
    ['size=abc', '1G'],
    ['foo=bar', '1G'],
    ['cluster_size=512', '2T'],
    ['preallocation=metadata,backing_file=base.raw,backing_fmt=raw', '1M'],
  ])('-o %s (size %s): refused with qemu-img’s message, no file left', async (o, size) => {
    writeFileSync(join(dir, 'base.raw'), Buffer.alloc(1 << 20));
    const path = join(dir, 'x.qcow2');
    const theirs = await exits('qemu-img', ['create', '-f', 'qcow2', '-o', o, path, size]);
    expect(theirs.code).toBe(1);
    expect(existsSync(path)).toBe(false);
    const message = theirs.stderr.split('\n')[0]!.replace(`qemu-img: ${path}: `, '');
    const ours = await create('-f', 'qcow2', '-o', o, path, size);
    expect(ours.code).toBe(1);
    expect(ours.stderr).toContain(message);
    expect(existsSync(path)).toBe(false);
  });

  it('raw: a bad preallocation is refused, no file left', async () => {
    const path = join(dir, 'x.raw');
    const ours = await create('-f', 'raw', '-o', 'preallocation=bogus', path, '1M');
    expect(ours.code).toBe(1);
    expect(ours.stderr).toContain("Parameter 'preallocation' does not accept value 'bogus'");
    expect(existsSync(path)).toBe(false);
  });

  it('an existing file is left as it was', async () => {
    const path = join(dir, 'keep.qcow2');
    writeFileSync(path, 'precious');
    for (const o of ['cluster_size=3k', 'refcount_bits=3', 'lazy_refcounts=maybe']) {
      const ours = await create('-f', 'qcow2', '-o', o, path, '1G');
      expect(ours.code).not.toBe(0);
      expect(readFileSync(path, 'utf8')).toBe('precious');
    }
  });

  it('rounds the size up to 512 bytes as qemu-img does', async () => {
    for (const [tool, args] of [
      ['qemu-img', ['create', '-q']],
      [process.execPath, [CLI, 'create', '-q']],
    ] as const) {
      const path = join(dir, `${tool === 'qemu-img' ? 'theirs' : 'ours'}.qcow2`);
      await run(tool, [...args, '-f', 'qcow2', path, '1000']);
      const info = JSON.parse(await run('qemu-img', ['info', '--output=json', path]));
      expect(info['virtual-size']).toBe(1024);
    }
  });
});

describe('vm-disk create failing while it writes', () => {
  // A file size limit makes the writes fail (EFBIG: Node ignores SIGXFSZ).
  const limited = (args: string[]) =>
    exits('prlimit', ['--fsize=1048576', process.execPath, CLI, 'create', '-q', ...args]);

  it('removes the file it created', async () => {
    for (const args of [
      ['-f', 'raw', join(dir, 'a.raw'), '4M'],
      ['-f', 'qcow2', '-o', 'preallocation=full', join(dir, 'a.qcow2'), '4M'],
    ]) {
      const path = args.at(-2)!;
      const ours = await limited(args);
      expect(ours.code).toBe(1);
      expect(ours.stderr).toContain('EFBIG');
      expect(existsSync(path)).toBe(false);
    }
  });

  it('never removes a file that was there before', async () => {
    const path = join(dir, 'there.raw');
    writeFileSync(path, 'x');
    const ours = await limited(['-f', 'raw', path, '4M']);
    expect(ours.code).toBe(1);
    expect(existsSync(path)).toBe(true);
  });
});
