// The send buffer of an NBD client's unix socket, as the kernel reports it (ss, from
// iproute2): vm-disk serve enlarges it to 4 MiB so that 256 KiB READ replies do not wait
// for the client between pieces (nbd-socket.ts); TCP sockets keep the kernel's autotuning.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, startServe, useScratch } from './harness/daemon.ts';

const scratch = useScratch('vmdisk-nbd-socket-');

/** The send buffer sizes (skmem tb) of the unix sockets process `pid` holds. */
function unixSendBuffers(pid: number): number[] {
  const out = execFileSync('ss', ['-x', '-m', '-p'], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => l.includes(`pid=${pid},`))
    .map((l) => Number(/\btb(\d+)/.exec(l)?.[1]));
}

describe('vm-disk serve: NBD unix sockets', () => {
  it("a client's socket gets a 4 MiB send buffer, and a 1 MiB read comes back whole", async () => {
    const image = scratch.path('disk.raw');
    const sock = scratch.path('nbd.sock');
    await run('qemu-img', ['create', '-f', 'raw', image, '8M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 0 8M', image]);
    const serve = await startServe([
      '--blockdev',
      `driver=file,node-name=f0,filename=${image}`,
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=f0,name=disk',
    ]);
    scratch.running.push(serve);
    const pid = serve.child.pid as number;
    // Root may force the size; others get what net.core.wmem_max allows (doubled).
    const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    const expected = process.getuid?.() === 0 ? 4 << 20 : Math.min(4 << 20, 2 * wmemMax);
    expect(unixSendBuffers(pid)).not.toContain(expected); // the listening socket's own
    const io = await QemuIoSession.open(['-r', '-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    try {
      expect(await io.command('read -P 0x6b 1M 1M')).toMatch(/read 1048576\/1048576/);
      expect(unixSendBuffers(pid)).toContain(expected);
    } finally {
      await io.kill();
    }
  });
});
