// Backing chains for the image subcommands that change them (commit, rebase): copies of a
// chain in directories of their own (the backing names are relative), and the check that
// two copies were left alike by vm-disk and qemu-img.
import { copyFileSync, mkdirSync } from 'node:fs';
import { basename, join } from 'node:path';
import { expect } from 'vitest';
import { run } from './daemon.ts';
import { infoOf, mapOf } from './img.ts';

/** Copies of `files` into the directory `dir/name` (made if needed). */
export function chainCopy(dir: string, name: string, files: string[]): string {
  const to = join(dir, name);
  mkdirSync(to, { recursive: true });
  for (const f of files) copyFileSync(f, join(to, basename(f)));
  return to;
}

/** qemu-img's -p output with repeated redraws of one value collapsed (their count varies). */
export const collapseProgress = (s: string): string =>
  s.replace(/( {4}\(\d+\.\d\d\/100%\)\r)\1+/g, '$1');

/** The files `files` of two directories read, map, describe and check alike. */
export async function sameLayers(ours: string, theirs: string, files: string[]): Promise<void> {
  for (const f of files) {
    const [a, b] = [join(ours, f), join(theirs, f)];
    await run('qemu-img', ['compare', '-U', a, b]);
    expect(await mapOf(a), f).toEqual(await mapOf(b));
    // Absolute names differ by their directory only.
    const strip = (info: Record<string, unknown>, d: string) => {
      const { 'full-backing-filename': _, ...rest } = info;
      return JSON.parse(JSON.stringify(rest).replaceAll(d, '<dir>'));
    };
    expect(strip(await infoOf(a), ours), f).toEqual(strip(await infoOf(b), theirs));
    if (f.endsWith('.qcow2')) await run('qemu-img', ['check', a]);
  }
}

/**
 * In `d`: backing.img, a copy of `backing` (raw when `backingFormat` says so, else qcow2),
 * and overlay.qcow2 over it (qcow2 options `options`), written by qemu-io at 60k+200k
 * (0x99), zeroed at 3M+64k and written at 8100k+4k (0x98).
 */
export async function overlayOver(
  d: string,
  backing: string,
  backingFormat: 'raw' | 'qcow2',
  options: string,
): Promise<void> {
  copyFileSync(backing, join(d, 'backing.img'));
  const overlay = join(d, 'overlay.qcow2');
  const o = options ? ['-o', options] : [];
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-F',
    backingFormat,
    ...o,
    '-b',
    'backing.img',
    overlay,
  ]);
  const writes = ['write -P 0x99 60k 200k', 'write -z 3M 64k', 'write -P 0x98 8100k 4k'];
  await run('qemu-io', [...writes.flatMap((c) => ['-c', c]), overlay]);
}
