// Who holds an image: the byte-range locks the kernel lists in /proc/locks.
import { readFileSync, statSync } from 'node:fs';

/** The bytes of `path` locked by anyone (OFD locks name no process), from /proc/locks. */
export function lockedBytes(path: string): number[] {
  const ino = statSync(path).ino;
  const bytes: number[] = [];
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[1] !== 'OFDLCK' || Number(f[5]!.split(':')[2]) !== ino) continue;
    for (let b = Number(f[6]); b <= Number(f[7]); b++) bytes.push(b);
  }
  return bytes.sort((a, b) => a - b);
}
