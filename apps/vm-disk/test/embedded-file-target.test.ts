// An embedder's NBD server over io_uring: @vmdisk/nbd's FileTarget.fromFile on an
// @vmdisk/engine EngineFile (the packages used together, without the block graph), checked
// with qemu-io's patterned writes and reads and qemu-img compare against the file itself.
import { readFileSync } from 'node:fs';
import { openEngine } from '@vmdisk/engine';
import { FileTarget, NbdServer } from '@vmdisk/nbd';
import { describe, expect, it } from 'vitest';
import { run, useScratch } from './harness/daemon.ts';

const scratch = useScratch('vmdisk-embedded-');

describe('FileTarget.fromFile on an EngineFile', () => {
  it('serves the file through io_uring: what qemu-io writes is in it, reads and compare agree', async () => {
    const image = scratch.path('disk.raw');
    await run('qemu-img', ['create', '-f', 'raw', image, '16M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 16M', image]);
    const engine = await openEngine();
    expect(engine.backend).toBe('io_uring');
    const target = await FileTarget.fromFile(await engine.openFile(image));
    expect(target.size()).toBe(16 << 20);
    const server = new NbdServer();
    server.addExport({ name: 'disk', target, writable: true });
    const sock = scratch.path('nbd.sock');
    await server.listen({ path: sock });
    const uri = `nbd+unix:///disk?socket=${sock}`;
    try {
      const io = await run('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0xa5 1M 300k',
        '-c',
        'write -P 0x5a 7M 4k',
        '-c',
        'flush',
        '-c',
        'read -P 0xa5 1M 300k',
        '-c',
        'read -P 0x11 0 1M',
        '-c',
        'read -P 0x5a 7M 4k',
        uri,
      ]);
      expect(io).not.toMatch(/Pattern verification failed|error/i);
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri]);
      expect(cmp).toContain('Images are identical');
      const disk = readFileSync(image);
      expect(disk.subarray(1 << 20, (1 << 20) + 300 * 1024).every((b) => b === 0xa5)).toBe(true);
      expect(disk.subarray(7 << 20, (7 << 20) + 4096).every((b) => b === 0x5a)).toBe(true);
    } finally {
      await server.close();
      await target.close();
      await engine.close();
    }
  });
});
