// qemu-img as the judge of an image's allocation.
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
  return new Promise((resolve, reject) => {
    execFile('qemu-img', args, { maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`qemu-img ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(JSON.parse(stdout) as QemuImgMapEntry[]);
    });
  });
}
