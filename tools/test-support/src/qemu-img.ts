// qemu-img (and qemu-nbd) as the judges of an image's allocation and bitmaps.
import { execFile } from 'node:child_process';

/** An entry of `qemu-img map --output=json`. */
export interface QemuImgMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map -U --output=json -f FORMAT FILE` (-U: the image may be open elsewhere). */
export function qemuImgMap(file: string, format: string): Promise<QemuImgMapEntry[]> {
  const args = ['map', '-U', '--output=json', '-f', format, file];
  return runTool('qemu-img', args).then((out) => JSON.parse(out) as QemuImgMapEntry[]);
}

function runTool(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

/** A persistent bitmap as `qemu-img info --output=json` lists it. */
export interface QemuImgBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

/** The bitmaps `qemu-img info -U` lists for a qcow2 image (undefined: it lists none). */
export async function qemuImgBitmaps(file: string): Promise<QemuImgBitmap[] | undefined> {
  const info = JSON.parse(await runTool('qemu-img', ['info', '-U', '--output=json', file])) as {
    'format-specific'?: { data: { bitmaps?: QemuImgBitmap[] } };
  };
  return info['format-specific']?.data.bitmaps;
}

/** The dirty extents QEMU reads from bitmap `name` of a qcow2 image (qemu-nbd -B, nbdinfo --map). */
export async function qemuDirtyExtents(
  file: string,
  name: string,
): Promise<{ offset: number; length: number }[]> {
  const qemuNbd = ['qemu-nbd', '-r', '-f', 'qcow2', '-B', name, file];
  const out = await runTool('nbdinfo', [
    '--json',
    `--map=qemu:dirty-bitmap:${name}`,
    '--',
    '[',
    ...qemuNbd,
    ']',
  ]);
  return (JSON.parse(out) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type === 1)
    .map(({ offset, length }) => ({ offset, length }));
}
