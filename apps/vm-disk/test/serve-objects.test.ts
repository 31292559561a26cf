// Objects in `vm-disk serve`: one registry for --object, QMP object-add/object-del, the
// block drivers (throttle's throttle-group, nbd's tls-creds) and the NBD server, answering
// as qemu-storage-daemon 7.2 does (the same requests go to both).
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  monitorArgs,
  type RunningProcess,
  run,
  start,
  startQsd,
  startServe,
  waitFor,
} from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

let dir: string;
const processes: RunningProcess[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-objects-'));
});
afterAll(async () => {
  await Promise.all(processes.map((p) => p.stop('SIGKILL')));
  rmSync(dir, { recursive: true, force: true });
});

async function negotiated(qmp: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(qmp);
  expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
  return client;
}

/** vm-disk serve and qemu-storage-daemon, each with `args` and a monitor. */
async function pair(name: string, args: string[]): Promise<[QmpTestClient, QmpTestClient]> {
  const oursQmp = join(dir, `${name}-ours.qmp`);
  const theirsQmp = join(dir, `${name}-theirs.qmp`);
  processes.push(await startServe([...args, ...monitorArgs(oursQmp)]));
  processes.push(await startQsd([...args, ...monitorArgs(theirsQmp)], theirsQmp));
  return [await negotiated(oursQmp), await negotiated(theirsQmp)];
}

const generic = (desc: string): QmpMessage => ({ error: { class: 'GenericError', desc } });
const ok: QmpMessage = { return: {} };

/** qom-list /objects, sorted (QEMU lists them in hash order). */
async function objects(client: QmpTestClient): Promise<unknown> {
  const reply = await client.execute({ execute: 'qom-list', arguments: { path: '/objects' } });
  return (reply.return as { name: string }[]).sort((a, b) => a.name.localeCompare(b.name));
}

describe('objects, as qemu-storage-daemon has them', () => {
  it('object-add and object-del answer as qemu-storage-daemon does', async () => {
    const [ours, theirs] = await pair('qmp', []);
    const both = async (execute: string, args: unknown, expected: QmpMessage) => {
      const request = { execute, arguments: args };
      expect(await ours.execute(request), `vm-disk: ${JSON.stringify(request)}`).toEqual(expected);
      expect(await theirs.execute(request), `qsd: ${JSON.stringify(request)}`).toEqual(expected);
    };
    const add = (args: unknown, expected: QmpMessage) => both('object-add', args, expected);
    const tg = { 'qom-type': 'throttle-group', id: 't0', 'x-iops-total': 100 };
    await add(tg, ok);
    await add(tg, generic("attempt to add duplicate property 't0' to object (type 'container')"));
    await add({ 'qom-type': 'throttle-group', id: 't1', limits: { 'iops-total': 50 } }, ok);
    await add(
      { 'qom-type': 'throttle-group', id: 't2', 'x-iops-total': '5' },
      generic("Invalid parameter type for 'x-iops-total', expected: integer"),
    );
    await add(
      { 'qom-type': 'throttle-group', id: 't2', bogus: 1 },
      generic("Parameter 'bogus' is unexpected"),
    );
    await add(
      { 'qom-type': 'nosuch', id: 'x' },
      generic("Parameter 'qom-type' does not accept value 'nosuch'"),
    );
    await add({ 'qom-type': 'throttle-group' }, generic("Parameter 'id' is missing"));
    await add({ id: 'x' }, generic("Parameter 'qom-type' is missing"));
    await add(
      { 'qom-type': 'throttle-group', id: '9bad' },
      generic("Parameter 'id' expects an identifier"),
    );
    await add({ 'qom-type': 'secret', id: 's1', data: 'aGVsbG8=', format: 'base64' }, ok);
    await add(
      { 'qom-type': 'secret', id: 's2', data: '!!', format: 'base64' },
      generic('Base64 data contains invalid characters'),
    );
    await add(
      { 'qom-type': 'secret', id: 's2' },
      generic("Either 'file' or 'data' must be provided"),
    );
    await add(
      { 'qom-type': 'secret', id: 's2', data: 'a', file: '/etc/hostname' },
      generic("'file' and 'data' are mutually exclusive"),
    );
    await add(
      { 'qom-type': 'tls-creds-psk', id: 'p0', dir, endpoint: 'client' },
      generic(`Unable to access credentials ${dir}/keys.psk: No such file or directory`),
    );
    // A throttle node holds its group: the group cannot go until the node has gone.
    await both('blockdev-add', { driver: 'null-co', 'node-name': 'n0' }, ok);
    const throttle = { driver: 'throttle', file: 'n0' };
    await both('blockdev-add', { ...throttle, 'node-name': 'th0', 'throttle-group': 't0' }, ok);
    await both(
      'blockdev-add',
      { ...throttle, 'node-name': 'th1', 'throttle-group': 'nosuch' },
      generic("Throttle group 'nosuch' does not exist"),
    );
    const del = (args: unknown, expected: QmpMessage) => both('object-del', args, expected);
    await del({ id: 't0' }, generic("object 't0' is in use, can not be deleted"));
    await del({ id: 'nosuch' }, generic("object 'nosuch' not found"));
    await del({}, generic("Parameter 'id' is missing"));
    await del({ id: 't1' }, ok);
    expect(await objects(ours)).toEqual(await objects(theirs));
    await both('blockdev-del', { 'node-name': 'th0' }, ok);
    await del({ id: 't0' }, ok);
    await both(
      'qom-list',
      { path: '/nosuch' },
      { error: { class: 'DeviceNotFound', desc: "Device '/nosuch' not found" } },
    );
    ours.close();
    theirs.close();
  });

  it('--object throttle-group (x-KEY limits) and a throttle blockdev that uses it', async () => {
    const args = [
      '--object',
      'throttle-group,id=t0,x-iops-total=1000,x-iops-total-max=2000,x-bps-read=1048576',
      '--blockdev',
      'driver=null-co,node-name=n0,size=1048576',
      '--blockdev',
      'driver=throttle,node-name=th0,throttle-group=t0,file=n0',
    ];
    const [ours, theirs] = await pair('throttle', args);
    const nodes = await ours.execute({ execute: 'query-named-block-nodes' });
    expect(
      (nodes.return as Record<string, unknown>[]).find((n) => n['node-name'] === 'th0'),
    ).toMatchObject({
      drv: 'throttle',
      'throttle-group': 't0',
      limits: { 'iops-total': 1000, 'iops-total-max': 2000, 'bps-read': 1048576 },
    });
    for (const client of [ours, theirs]) {
      expect(await client.execute({ execute: 'object-del', arguments: { id: 't0' } })).toEqual(
        generic("object 't0' is in use, can not be deleted"),
      );
    }
    expect(await objects(ours)).toEqual(await objects(theirs));
    ours.close();
    theirs.close();
  });

  it('secret objects (data, file, base64) are listed by qom-list', async () => {
    const file = join(dir, 'secret.txt');
    writeFileSync(file, 'c2VjcmV0');
    const args = [
      '--object',
      'secret,id=s0,data=abc',
      '--object',
      `secret,id=s1,file=${file},format=base64`,
      '--object',
      '{"qom-type":"secret","id":"s2","data":"aGVsbG8=","format":"base64"}',
    ];
    const [ours, theirs] = await pair('secret', args);
    expect(await objects(ours)).toEqual([
      { name: 's0', type: 'child<secret>' },
      { name: 's1', type: 'child<secret>' },
      { name: 's2', type: 'child<secret>' },
      { name: 'type', type: 'string' },
    ]);
    expect(await objects(ours)).toEqual(await objects(theirs));
    ours.close();
    theirs.close();
  });

  it('an nbd blockdev reaches a TLS NBD server with --object tls-creds-psk', async () => {
    const serverDir = join(dir, 'psk-server');
    const clientDir = join(dir, 'psk-client');
    mkdirSync(serverDir);
    mkdirSync(clientDir);
    const key = 'ab'.repeat(16);
    writeFileSync(join(serverDir, 'keys.psk'), `alice:${key}\n`);
    writeFileSync(join(clientDir, 'keys.psk'), `alice:${key}\n`);
    const image = join(dir, 'remote.raw');
    writeFileSync(image, Buffer.alloc(1 << 20, 0x5a));
    const remote = join(dir, 'remote.sock');
    const qemuNbd = start('qemu-nbd', [
      '--object',
      `tls-creds-psk,id=tls0,endpoint=server,dir=${serverDir}`,
      '--tls-creds',
      'tls0',
      '-f',
      'raw',
      '-x',
      'remote',
      '-k',
      remote,
      '--persistent',
      image,
    ]);
    processes.push(qemuNbd);
    await waitFor('qemu-nbd', () => existsSync(remote));
    const local = join(dir, 'local.sock');
    processes.push(
      await startServe([
        '--object',
        `tls-creds-psk,id=c0,endpoint=client,dir=${clientDir},username=alice`,
        '--blockdev',
        `driver=nbd,node-name=n0,server.type=unix,server.path=${remote},export=remote,tls-creds=c0`,
        '--nbd-server',
        `addr.type=unix,addr.path=${local}`,
        '--export',
        'type=nbd,id=e0,node-name=n0,name=disk',
      ]),
    );
    await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0x5a 0 1M',
      `nbd+unix:///disk?socket=${local}`,
    ]);
  });
});
