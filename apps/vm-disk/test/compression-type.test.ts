// A qcow2 image whose header names a compression type nobody knows: `info`, `map` and
// `serve` refuse it with qemu-img's message, instead of calling it zlib and writing to it.
import { mkdtempSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CLI, run, start } from './harness/daemon.ts';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-ctype-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

async function poke(path: string, offset: number, byte: number): Promise<void> {
  const fh = await open(path, 'r+');
  await fh.write(Uint8Array.of(byte), 0, 1, offset);
  await fh.close();
}

describe('qcow2 with an unknown compression type', () => {
  it('is refused by info, map and serve as qemu-img refuses it', async () => {
    const path = join(dir, 'ctype.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', path, '1M']);
    await poke(path, 79, 8); // incompatible feature bit 3: compression type
    await poke(path, 104, 7); // compression_type 7
    const message = 'qcow2: unknown compression type: 7';
    const theirs = start('qemu-img', ['info', path]);
    expect(await theirs.exited).toBe(1);
    expect(theirs.stderr()).toContain(message);
    for (const args of [
      ['info', path],
      ['info', '--output=json', path],
      ['map', path],
      [
        'serve',
        '--blockdev',
        JSON.stringify({
          driver: 'qcow2',
          'node-name': 'd0',
          file: { driver: 'file', filename: path },
        }),
      ],
    ]) {
      const ours = start(process.execPath, [CLI, ...args]);
      expect(await ours.exited, args[0]).toBe(1);
      expect(ours.stderr()).toContain(message);
      expect(ours.stderr()).toContain('ERR_VMDISK_BLOCK_QCOW2_UNSUPPORTED_FEATURE');
    }
  });
});
