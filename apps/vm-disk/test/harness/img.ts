// The image subcommands against qemu-img: the same invocation of both on copies of the
// same images, and the images (made with qemu-img and qemu-io) they run on.
import { execFile } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, run } from './daemon.ts';

export interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end, whatever its exit status. */
export function outcome(command: string, args: string[], timeout = 120_000): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: unknown }).code as number) : 0;
      resolve({ code: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}

export const vmDisk = (args: string[]) => outcome(process.execPath, [CLI, ...args]);
export const qemuImg = (args: string[]) => outcome('qemu-img', args);

/** A copy of `path` named after it (for each tool to work on its own). */
export function copy(path: string, suffix: string): string {
  const to = `${path}.${suffix}`;
  copyFileSync(path, to);
  return to;
}

const io = (format: string, path: string, ...cmds: string[]) =>
  run('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), path]);

/** Data, zeros and holes over an 8 MiB disk (the same in every source image). */
const WRITES = [
  'write -P 0x11 0 64k',
  'write -P 0x22 1M 192k',
  'write -z 2M 128k',
  'write -P 0x33 3M 4k',
  'write -P 0x44 5100k 300k',
  'write -P 0x55 8128k 64k',
];

export interface Sources {
  raw: string;
  qcow2v2: string;
  qcow2v3: string;
  compressed: string;
  /** base <- mid <- top, each layer with data of its own. */
  chain: string;
  chainBase: string;
}

export const SIZE = 8 << 20;

/** The source images of the tests, made by qemu-img in `dir`. */
export async function makeSources(dir: string): Promise<Sources> {
  const p = (name: string) => join(dir, name);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('v3.qcow2'), String(SIZE)]);
  await io('qcow2', p('v3.qcow2'), ...WRITES);
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    'compat=0.10',
    p('v2.qcow2'),
    String(SIZE),
  ]);
  await io('qcow2', p('v2.qcow2'), ...WRITES);
  await run('qemu-img', ['convert', '-O', 'raw', p('v3.qcow2'), p('src.raw')]);
  await run('qemu-img', ['convert', '-c', '-O', 'qcow2', p('v3.qcow2'), p('compressed.qcow2')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('base.qcow2'), String(SIZE)]);
  await io('qcow2', p('base.qcow2'), 'write -P 0x61 0 1M', 'write -P 0x62 4M 512k');
  const overlay = (backing: string, file: string) =>
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', backing, p(file)]);
  await overlay('base.qcow2', 'mid.qcow2');
  await io('qcow2', p('mid.qcow2'), 'write -P 0x71 512k 1M', 'write -z 4M 64k');
  await overlay('mid.qcow2', 'top.qcow2');
  await io('qcow2', p('top.qcow2'), 'write -P 0x81 1M 64k', 'write -P 0x82 7M 64k');
  return {
    raw: p('src.raw'),
    qcow2v2: p('v2.qcow2'),
    qcow2v3: p('v3.qcow2'),
    compressed: p('compressed.qcow2'),
    chain: p('top.qcow2'),
    chainBase: p('base.qcow2'),
  };
}

/** qemu-img info as data, without what differs between two files of the same content. */
export async function infoOf(path: string): Promise<Record<string, unknown>> {
  const {
    filename: _f,
    'actual-size': _a,
    ...rest
  } = JSON.parse(await run('qemu-img', ['info', '--output=json', '-U', path]));
  return rest;
}

/**
 * qemu-img map as data, without host offsets (which differ between writers, and split
 * entries where clusters are not contiguous in the file): neighbours that differ only
 * in their host offsets are merged.
 */
export async function mapOf(path: string): Promise<Record<string, unknown>[]> {
  const entries = JSON.parse(await run('qemu-img', ['map', '--output=json', '-U', path]));
  const out: Record<string, unknown>[] = [];
  for (const { offset: _o, ...e } of entries as Record<string, unknown>[]) {
    const last = out.at(-1);
    const same =
      last &&
      (last.start as number) + (last.length as number) === e.start &&
      ['depth', 'present', 'zero', 'data', 'compressed'].every((k) => last[k] === e[k]);
    if (same) last.length = (last.length as number) + (e.length as number);
    else out.push(e);
  }
  return out;
}
