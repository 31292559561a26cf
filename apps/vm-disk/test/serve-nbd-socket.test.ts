// The send buffer of NBD unix sockets, as the kernel reports it (ss, from iproute2): vm-disk
// serve enlarges it to 4 MiB so that 256 KiB READ replies do not wait for the client
// between pieces, and so that an nbd node's WRITEs (a mirror to another daemon) do not wait
// for the server (nbd-socket.ts); TCP sockets keep the kernel's autotuning.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { QemuIoSession } from '@vmdisk/test-support';
import { describe, expect, it } from 'vitest';
import { run, start, startServe, useScratch, waitFor } from './harness/daemon.ts';

const scratch = useScratch('vmdisk-nbd-socket-');

/** The send buffer sizes (skmem tb) of the unix sockets process `pid` holds. */
function unixSendBuffers(pid: number): number[] {
  const out = execFileSync('ss', ['-x', '-m', '-p'], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => l.includes(`pid=${pid},`))
    .map((l) => Number(/\btb(\d+)/.exec(l)?.[1]));
}

/** Root may force the size; others get what net.core.wmem_max allows (doubled). */
function expectedSendBuffer(): number {
  const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
  return process.getuid?.() === 0 ? 4 << 20 : Math.min(4 << 20, 2 * wmemMax);
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
    const expected = expectedSendBuffer();
    expect(unixSendBuffers(pid)).not.toContain(expected); // the listening socket's own
    const io = await QemuIoSession.open(['-r', '-f', 'raw', `nbd+unix:///disk?socket=${sock}`]);
    try {
      expect(await io.command('read -P 0x6b 1M 1M')).toMatch(/read 1048576\/1048576/);
      expect(unixSendBuffers(pid)).toContain(expected);
    } finally {
      await io.kill();
    }
  });

  it("an nbd node's socket to its server gets the 4 MiB send buffer too, and writes land", async () => {
    const image = scratch.path('remote.raw');
    const remote = scratch.path('remote.sock');
    await run('qemu-img', ['create', '-f', 'raw', image, '8M']);
    const qemuNbd = start('qemu-nbd', [
      '-f',
      'raw',
      '-x',
      'r',
      '-k',
      remote,
      '--persistent',
      image,
    ]);
    scratch.running.push(qemuNbd);
    await waitFor('qemu-nbd', () => existsSync(remote));
    const qmp = scratch.path('qmp.sock');
    const serve = await startServe([
      '--chardev',
      `socket,id=m0,path=${qmp},server=on,wait=off`,
      '--monitor',
      'chardev=m0',
      '--blockdev',
      `driver=nbd,node-name=n0,server.type=unix,server.path=${remote},export=r`,
    ]);
    scratch.running.push(serve);
    // No export, no QMP client: the one unix socket vm-disk connected is the node's.
    expect(unixSendBuffers(serve.child.pid as number)).toContain(expectedSendBuffer());
    await serve.stop();
    await qemuNbd.stop();
  });
});
