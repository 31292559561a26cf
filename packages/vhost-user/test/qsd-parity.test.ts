// The same raw front-end session (raw-client-run.ts, as a process) against
// qemu-storage-daemon 7.2's vhost-user-blk export and against VhostUserBlkServer, on two
// copies of one file: the config space, every status and used length, and the files
// afterwards must be the same (discard is a no-op on both: FileTarget has no trim, and
// qemu-storage-daemon's file node ignores it without discard=unmap). Features: ours are
// qemu-storage-daemon's but for those we leave out on purpose (listed below).
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { FileTarget } from '@vmdisk/nbd';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { VhostUserBlkServer } from '../src/index.ts';
import { bit, F } from '../src/protocol.ts';

const exec = promisify(execFile);
const RUN = join(import.meta.dirname, 'raw-client-run.ts');

/**
 * What qemu-storage-daemon offers and we do not: SIZE_MAX (with size_max 0, nothing to
 * tell), NOTIFY_ON_EMPTY and LOG_ALL (dirty logging for live migration, not supported).
 */
const NOT_OFFERED = bit(F.BLK_SIZE_MAX) | bit(24) | bit(26);

let dir: string;
let children: ChildProcess[];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-parity-'));
  children = [];
});

afterEach(() => {
  for (const c of children) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

async function session(socket: string): Promise<Record<string, unknown>> {
  const { stdout } = await exec(process.execPath, [RUN, socket], { timeout: 30_000 });
  return JSON.parse(stdout);
}

async function waitForSocket(path: string, child: ChildProcess, log: () => string): Promise<void> {
  while (!existsSync(path)) {
    if (child.exitCode !== null) throw new Error(`qemu-storage-daemon exited: ${log()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function pattern(len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31) >> 3;
  return b;
}

describe('side by side with qemu-storage-daemon 7.2', () => {
  it('offers the same device and answers every request the same way', async () => {
    const initial = pattern(4 * 1024 * 1024);
    const theirsFile = join(dir, 'theirs.raw');
    const oursFile = join(dir, 'ours.raw');
    writeFileSync(theirsFile, initial);
    writeFileSync(oursFile, initial);

    const theirsSock = join(dir, 'theirs.sock');
    const qsd = spawn('qemu-storage-daemon', [
      '--blockdev',
      `driver=file,node-name=n0,filename=${theirsFile}`,
      '--export',
      `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${theirsSock},writable=on`,
    ]);
    children.push(qsd);
    let qsdLog = '';
    qsd.stderr.setEncoding('utf8').on('data', (d: string) => {
      qsdLog += d;
    });
    await waitForSocket(theirsSock, qsd, () => qsdLog);
    const theirs = await session(theirsSock);

    const target = await FileTarget.open(oursFile);
    const oursSock = join(dir, 'ours.sock');
    const server = new VhostUserBlkServer({ path: oursSock, target, writable: true });
    server.listen();
    try {
      const ours = await session(oursSock);
      const theirFeatures = BigInt(`0x${theirs.features}`);
      expect(BigInt(`0x${ours.features}`)).toBe(theirFeatures & ~NOT_OFFERED);
      expect({ ...ours, features: '', protocol: '' }).toEqual({
        ...theirs,
        features: '',
        protocol: '',
      });
    } finally {
      await server.close();
      await target.close();
    }
    expect(Buffer.compare(readFileSync(oursFile), readFileSync(theirsFile))).toBe(0);
    expect(Buffer.compare(readFileSync(oursFile), initial)).not.toBe(0);
  });
});
