// A remote export proxied: qemu-nbd or nbdkit <- NbdClient <- nbdClientTarget <- our
// NbdServer <- qemu-io / nbdinfo. What goes through the proxy lands on the remote disk,
// and the map nbdinfo reads through the proxy is the remote's own.

import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdClient, NbdServer, nbdClientTarget } from '../src/index.ts';
import { makeTempDir, nbdkit, type Peer, qemuNbd, removeDir, run } from './client-peers.ts';

const MiB = 1024 * 1024;

/** `nbdinfo --map` as runs of [start, length, type] with equal neighbours merged. */
async function nbdinfoMap(uri: string, context?: string): Promise<[number, number, number][]> {
  const args = context ? [`--map=${context}`, uri] : ['--map', uri];
  const { stdout } = await run('nbdinfo', args);
  const runs: [number, number, number][] = [];
  for (const line of stdout.trim().split('\n')) {
    const [start, length, type] = line.trim().split(/\s+/).map(Number) as [number, number, number];
    const last = runs[runs.length - 1];
    if (last && last[2] === type && last[0] + last[1] === start) last[1] += length;
    else runs.push([start, length, type]);
  }
  return runs;
}

describe('a remote export proxied through nbdClientTarget and our NbdServer', () => {
  let dir: string;
  let peers: Peer[];
  let clients: NbdClient[];
  let server: NbdServer | undefined;

  beforeEach(async () => {
    dir = await makeTempDir();
    peers = [];
    clients = [];
    server = undefined;
  });
  afterEach(async () => {
    await server?.close();
    for (const c of clients) c.destroy();
    for (const p of peers) await p.stop('SIGKILL');
    await removeDir(dir);
  });

  const proxy = async (client: NbdClient): Promise<string> => {
    server = new NbdServer();
    server.addExport({
      name: 'proxy',
      target: nbdClientTarget(client),
      writable: !client.readOnly,
    });
    const socket = join(dir, 'proxy.sock');
    await server.listen({ path: socket });
    return `nbd+unix:///proxy?socket=${socket}`;
  };

  it('carries qemu-io writes to nbdkit and its block status back', async () => {
    const p = await nbdkit(dir, ['memory', '4M']);
    peers.push(p);
    const remote = await NbdClient.connect({ path: p.socket! });
    clients.push(remote);
    const uri = await proxy(remote);

    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 0 64k',
      '-c',
      'write -P 0xcd 1M 256k',
      '-c',
      'write -z 1088k 64k',
      '-c',
      'read -P 0xab 0 64k',
      '-c',
      'read -P 0xcd 1M 64k',
      '-c',
      'read -P 0 1088k 64k',
      uri,
    ]);
    // Straight from nbdkit, not through the proxy.
    const direct = await NbdClient.connect({ path: p.socket! });
    clients.push(direct);
    expect((await direct.read(0, 64 * 1024)).every((b) => b === 0xab)).toBe(true);
    expect((await direct.read(1 * MiB, 64 * 1024)).every((b) => b === 0xcd)).toBe(true);
    expect((await direct.read(1088 * 1024, 64 * 1024)).every((b) => b === 0)).toBe(true);
    await direct.close();

    const viaProxy = await nbdinfoMap(uri);
    const straight = await nbdinfoMap(`nbd+unix:///?socket=${p.socket!}`);
    expect(viaProxy).toEqual(straight);
    expect(viaProxy.length).toBeGreaterThanOrEqual(3);
  });

  it('passes qemu:allocation-depth of a qcow2 chain served by qemu-nbd', async () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', base]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 2 2M 1M', top]);
    const p = await qemuNbd(dir, ['-f', 'qcow2', '-A', '-r', top]);
    peers.push(p);
    const remote = await NbdClient.connect({ path: p.socket! }, { allocationDepth: true });
    clients.push(remote);
    expect(remote.readOnly).toBe(true);
    const uri = await proxy(remote);

    const straightUri = `nbd+unix:///?socket=${p.socket!}`;
    const viaProxy = await nbdinfoMap(uri, 'qemu:allocation-depth');
    expect(viaProxy).toEqual(await nbdinfoMap(straightUri, 'qemu:allocation-depth'));
    expect(viaProxy.map((r) => r[2])).toEqual([2, 0, 1, 0]);
    expect(await nbdinfoMap(uri)).toEqual(await nbdinfoMap(straightUri));
    // Read-only remote, read-only proxy.
    const refused = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 3 0 4k', uri]).then(
      (r) => r.stdout + r.stderr,
      (e: { stdout?: string; stderr?: string }) => `${e.stdout ?? ''}${e.stderr ?? ''}`,
    );
    expect(refused).toContain('Permission denied');
  });
});
