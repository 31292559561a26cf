// `vm-disk serve` end to end: the built bin serving image files over NBD to qemu-io,
// qemu-img and nbdinfo, driven through QMP, stopped by signals and by `quit`.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, monitorArgs, run, start, startQsd, useScratch, waitFor } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-serve-');
const { running, serve } = scratch;

function fileBlockdevs(image: string): string[] {
  return [
    '--blockdev',
    JSON.stringify({ driver: 'file', 'node-name': 'f0', filename: image }),
    '--blockdev',
    JSON.stringify({ driver: 'raw', 'node-name': 'd0', file: 'f0' }),
  ];
}

describe('vm-disk serve', () => {
  it('serves a raw image read-write to qemu-io and qemu-img, and stops cleanly on SIGTERM', async () => {
    const image = scratch.path('disk.raw');
    await run('qemu-img', ['create', '-f', 'raw', image, '8M']);
    const sock = scratch.path('nbd.sock');
    const pidfile = scratch.path('vm-disk.pid');
    const p = await serve([
      ...fileBlockdevs(image),
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
      '--pidfile',
      pidfile,
    ]);
    expect(readFileSync(pidfile, 'utf8').trim()).toBe(String(p.child.pid));
    const uri = `nbd+unix:///disk?socket=${sock}`;
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 1M 64k',
      '-c',
      'write -z 2M 64k',
      '-c',
      'flush',
      uri,
    ]);
    const read = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0xab 1M 64k',
      '-c',
      'read -P 0 2M 64k',
      uri,
    ]);
    expect(read).not.toMatch(/Pattern verification failed/);
    const info = JSON.parse(await run('qemu-img', ['info', '--output=json', uri]));
    expect(info['virtual-size']).toBe(8 << 20);
    // NBD_CMD_BLOCK_STATUS looks for the file's holes (reads skip that lookup).
    const map = JSON.parse(await run('nbdinfo', ['--map', '--json', uri])) as {
      offset: number;
      length: number;
      type: number;
    }[];
    expect(map.find((e) => e.offset <= 1 << 20 && e.offset + e.length > 1 << 20)?.type).toBe(0);
    expect(map.find((e) => e.offset <= 4 << 20 && e.offset + e.length > 4 << 20)?.type).toBe(3);
    expect(await p.stop('SIGTERM')).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
    const copy = scratch.path('copy.raw');
    await run('qemu-img', ['create', '-f', 'raw', copy, '8M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 1M 64k', copy]);
    expect(await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, copy])).toContain(
      'identical',
    );
  });

  it('is driven through QMP: nodes, NBD server, exports, events, quit', async () => {
    const image = scratch.path('disk.raw');
    writeFileSync(image, Buffer.alloc(4 << 20, 0x5a));
    const qmpSock = scratch.path('qmp.sock');
    const nbdSock = scratch.path('nbd.sock');
    const p = await serve([...monitorArgs(qmpSock)]);
    const { client, greeting } = await QmpTestClient.connect(qmpSock);
    try {
      expect(greeting).toHaveProperty('QMP.version.qemu.major');
      expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
      const ok = { return: {} };
      expect(
        await client.execute({
          execute: 'blockdev-add',
          arguments: {
            driver: 'raw',
            'node-name': 'd0',
            file: { driver: 'file', filename: image },
          },
        }),
      ).toEqual(ok);
      expect(
        await client.execute({
          execute: 'blockdev-add',
          arguments: {
            driver: 'raw',
            'node-name': 'd1',
            file: { driver: 'file', filename: image },
            bogus: 1,
          },
        }),
      ).toMatchObject({
        error: { class: 'GenericError' },
      });
      const nodes = (await client.execute({ execute: 'query-named-block-nodes' })).return as {
        'node-name': string;
        drv: string;
      }[];
      expect(nodes.map((n) => n.drv).sort()).toEqual(['file', 'raw']);
      expect(
        await client.execute({
          execute: 'block-export-add',
          arguments: { type: 'nbd', id: 'e0', 'node-name': 'd0' },
        }),
      ).toMatchObject({
        error: { class: 'GenericError', desc: 'NBD server not running' },
      });
      expect(
        await client.execute({
          execute: 'nbd-server-start',
          arguments: { addr: { type: 'unix', data: { path: nbdSock } } },
        }),
      ).toEqual(ok);
      expect(
        await client.execute({
          execute: 'block-export-add',
          arguments: { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'disk' },
        }),
      ).toEqual(ok);
      expect((await client.execute({ execute: 'query-block-exports' })).return).toEqual([
        { type: 'nbd', id: 'e0', 'node-name': 'd0', 'shutting-down': false },
      ]);
      const list = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${nbdSock}`]);
      expect(
        JSON.parse(list).exports.map((e: { 'export-name': string }) => e['export-name']),
      ).toEqual(['disk']);
      await run('qemu-io', [
        '-r',
        '-f',
        'raw',
        '-c',
        'read -P 0x5a 0 4M',
        `nbd+unix:///disk?socket=${nbdSock}`,
      ]);
      expect(
        await client.execute({ execute: 'blockdev-del', arguments: { 'node-name': 'd0' } }),
      ).toMatchObject({
        error: { class: 'GenericError' },
      });
      // Once qemu-io has left, the export goes at once: its event comes before the reply.
      const count = (what: string) => p.stderr().split(`"event":"${what}"`).length - 1;
      await waitFor('qemu-io to leave', () => count('nbd-disconnect') >= count('nbd-connect'));
      client.sendRaw('{"execute":"block-export-del","arguments":{"id":"e0"}}\n');
      expect(await client.next()).toMatchObject({
        event: 'BLOCK_EXPORT_DELETED',
        data: { id: 'e0' },
      });
      expect(await client.next()).toEqual(ok);
      expect(
        await client.execute({ execute: 'block-export-del', arguments: { id: 'e0' } }),
      ).toMatchObject({
        error: { class: 'GenericError', desc: "Export 'e0' is not found" },
      });
      expect(
        await client.execute({ execute: 'blockdev-del', arguments: { 'node-name': 'd0' } }),
      ).toEqual(ok);
      expect(await client.execute({ execute: 'nbd-server-stop' })).toEqual(ok);
      expect(
        await client.execute({ execute: 'job-cancel', arguments: { id: 'nope' } }),
      ).toMatchObject({
        error: { class: 'GenericError', desc: 'Job not found' },
      });
      expect(await client.execute({ execute: 'quit' })).toEqual(ok);
    } finally {
      client.close();
    }
    expect(await p.exited).toBe(0);
  });

  it('takes a qemu-storage-daemon command line unchanged and serves what qemu-storage-daemon serves', async () => {
    const args = (image: string, sock: string, qmp: string) => [
      ...monitorArgs(qmp),
      '--blockdev',
      `driver=file,node-name=f0,filename=${image}`,
      '--blockdev',
      'driver=raw,node-name=d0,file=f0,offset=1048576,size=4194304',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on,description=differential',
    ];
    const ours = {
      image: scratch.path('ours.raw'),
      sock: scratch.path('ours.sock'),
      qmp: scratch.path('ours.qmp'),
    };
    const theirs = {
      image: scratch.path('theirs.raw'),
      sock: scratch.path('theirs.sock'),
      qmp: scratch.path('theirs.qmp'),
    };
    const content = Buffer.alloc(8 << 20);
    for (let i = 0; i < content.length; i += 4096) content.writeUInt32BE(i, i);
    writeFileSync(ours.image, content);
    writeFileSync(theirs.image, content);
    await serve(args(ours.image, ours.sock, ours.qmp));
    const qsd = await startQsd(args(theirs.image, theirs.sock, theirs.qmp), theirs.qmp);
    running.push(qsd);
    const uri = (sock: string) => `nbd+unix:///disk?socket=${sock}`;
    const info = async (sock: string) => {
      const j = JSON.parse(await run('nbdinfo', ['--json', uri(sock)])).exports[0];
      return {
        name: j['export-name'],
        description: j.description,
        size: j['export-size'],
        ro: j.is_read_only,
      };
    };
    expect(await info(ours.sock)).toEqual(await info(theirs.sock));
    // query-named-block-nodes: QEMU's fields, with QEMU's values.
    const qmpOf = async (sock: string) => {
      const { client } = await QmpTestClient.connect(sock);
      await client.execute({ execute: 'qmp_capabilities' });
      const nodes = (await client.execute({ execute: 'query-named-block-nodes' })).return as Record<
        string,
        unknown
      >[];
      client.close();
      return nodes.sort((a, b) => String(a['node-name']).localeCompare(String(b['node-name'])));
    };
    const mine = await qmpOf(ours.qmp);
    const reference = await qmpOf(theirs.qmp);
    expect(mine.map((n) => n['node-name'])).toEqual(reference.map((n) => n['node-name']));
    for (const [i, node] of reference.entries()) {
      const m = mine[i] as Record<string, unknown>;
      for (const key of Object.keys(node))
        expect(m, `${node['node-name']}.${key}`).toHaveProperty(key);
      for (const key of ['drv', 'ro', 'backing_file_depth', 'encrypted'])
        expect(m[key], key).toEqual(node[key]);
      expect((m.image as Record<string, unknown>)['virtual-size']).toEqual(
        (node.image as Record<string, unknown>)['virtual-size'],
      );
    }
    expect(mine.find((n) => n.drv === 'file')?.file).toBe(ours.image);
    for (const { sock } of [ours, theirs]) {
      await run('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x11 4095 8193',
        '-c',
        'write -z 65536 65536',
        '-c',
        'flush',
        uri(sock),
      ]);
    }
    await qsd.stop();
    expect(
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ours.image, theirs.image]),
    ).toContain('identical');
  });

  it('refuses bad options before starting anything, naming the option', async () => {
    const sock = scratch.path('nbd.sock');
    const p = start(process.execPath, [
      CLI,
      'serve',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=missing',
    ]);
    expect(await p.exited).toBe(2);
    expect(p.stderr()).toContain('--export');
    expect(existsSync(sock)).toBe(false);
  });

  it('fails to start, leaving nothing behind, when a node cannot be opened', async () => {
    const sock = scratch.path('nbd.sock');
    const p = start(process.execPath, [
      CLI,
      'serve',
      '--blockdev',
      JSON.stringify({ driver: 'file', 'node-name': 'f0', filename: scratch.path('absent.img') }),
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
    ]);
    expect(await p.exited).toBe(1);
    expect(p.stderr()).toMatch(/absent\.img|ENOENT/);
    await waitFor('no socket', () => !existsSync(sock));
  });
});
