// QMP arguments are typed as in QEMU: a value of the wrong type is refused with QEMU's
// words (never converted), members are checked in the schema's order, unknown ones last.
// The same requests go to `vm-disk serve` and to qemu-storage-daemon 7.2, and get the same
// error replies, for every command family that takes arguments.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CLI,
  monitorArgs,
  type RunningProcess,
  start,
  startQsd,
  startServe,
} from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

let dir: string;
let image: string;
const processes: RunningProcess[] = [];
let ours: QmpTestClient;
let theirs: QmpTestClient;

async function negotiated(qmp: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(qmp);
  expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
  return client;
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-qmp-args-'));
  image = join(dir, 'a.img');
  writeFileSync(image, Buffer.alloc(1 << 20));
  const oursQmp = join(dir, 'ours.qmp');
  const theirsQmp = join(dir, 'theirs.qmp');
  processes.push(await startServe(monitorArgs(oursQmp)));
  processes.push(await startQsd(monitorArgs(theirsQmp), theirsQmp));
  ours = await negotiated(oursQmp);
  theirs = await negotiated(theirsQmp);
});

afterAll(async () => {
  ours?.close();
  theirs?.close();
  await Promise.all(processes.map((p) => p.stop('SIGKILL')));
  rmSync(dir, { recursive: true, force: true });
});

function invalidType(key: string, expected: string): QmpMessage {
  return {
    error: {
      class: 'GenericError',
      desc: `Invalid parameter type for '${key}', expected: ${expected}`,
    },
  };
}
function generic(desc: string): QmpMessage {
  return { error: { class: 'GenericError', desc } };
}

/** Sends `request` to both daemons; both must answer `expected`. */
async function both(execute: string, args: unknown, expected: QmpMessage): Promise<void> {
  const request = { execute, arguments: args };
  expect(await ours.execute(request), `vm-disk: ${JSON.stringify(request)}`).toEqual(expected);
  expect(await theirs.execute(request), `qsd: ${JSON.stringify(request)}`).toEqual(expected);
}

const file = () => ({ driver: 'file', filename: image });

describe('QMP argument types, as qemu-storage-daemon checks them', () => {
  it('blockdev-add: common members, driver options, nested children, in QEMU order', async () => {
    const add = (args: unknown, expected: QmpMessage) => both('blockdev-add', args, expected);
    const raw = (extra: object) => ({ driver: 'raw', 'node-name': 'n1', file: file(), ...extra });
    await add(
      { driver: 'file', 'node-name': 'n1', filename: image, 'read-only': 'true' },
      {
        ...invalidType('read-only', 'boolean'),
      },
    );
    await add(
      { driver: 'file', 'node-name': 5, filename: image },
      invalidType('node-name', 'string'),
    );
    await add(
      { driver: 'file', filename: image },
      generic("'node-name' must be specified for the root node"),
    );
    // Types first: a missing node-name is only reported for options that are otherwise right.
    await add({ driver: 'file', filename: 5 }, invalidType('filename', 'string'));
    await add({ driver: 5, 'node-name': 'n1' }, invalidType('driver', 'string'));
    await add({ 'node-name': 'n1' }, generic("Parameter 'driver' is missing"));
    await add(
      { driver: 'nosuch', 'node-name': 'n1' },
      generic("Parameter 'driver' does not accept value 'nosuch'"),
    );
    await add(raw({ offset: '512' }), invalidType('offset', 'integer'));
    await add(raw({ offset: 1.5 }), invalidType('offset', 'integer'));
    await add(raw({ size: '4096' }), invalidType('size', 'integer'));
    await add(raw({ cache: { direct: 'on' } }), invalidType('cache.direct', 'boolean'));
    await add(raw({ cache: 5 }), invalidType('cache', 'object'));
    await add(
      raw({ cache: { writeback: true } }),
      generic("Parameter 'cache.writeback' is unexpected"),
    );
    await add(raw({ discard: 5 }), invalidType('discard', 'string'));
    await add(
      raw({ discard: 'sometimes' }),
      generic("Parameter 'discard' does not accept value 'sometimes'"),
    );
    await add(raw({ 'detect-zeroes': 5 }), invalidType('detect-zeroes', 'string'));
    await add(raw({ 'auto-read-only': 'on' }), invalidType('auto-read-only', 'boolean'));
    await add(raw({ 'read-only': null }), invalidType('read-only', 'boolean'));
    await add(raw({ bogus: 1 }), generic("Parameter 'bogus' is unexpected"));
    // Members in order, unknown ones last.
    await add(
      { driver: 'file', 'node-name': 'n1', bogus: 1 },
      generic("Parameter 'filename' is missing"),
    );
    await add(
      { driver: 'file', 'node-name': 'n1', filename: 5, 'read-only': 'x', bogus: 1 },
      invalidType('read-only', 'boolean'),
    );
    // Nested children: the key's full path.
    await add(
      raw({ file: { driver: 'file', filename: 5 } }),
      invalidType('file.filename', 'string'),
    );
    await add(
      raw({ file: { ...file(), 'read-only': 'on' } }),
      invalidType('file.read-only', 'boolean'),
    );
    await add(
      raw({ file: { ...file(), cache: { direct: 'on' } } }),
      invalidType('file.cache.direct', 'boolean'),
    );
    await add(
      raw({ file: { ...file(), 'node-name': 7 } }),
      invalidType('file.node-name', 'string'),
    );
    await add(raw({ file: { driver: 'file' } }), generic("Parameter 'file.filename' is missing"));
    await add(raw({ file: { filename: image } }), generic("Parameter 'file.driver' is missing"));
    await add(raw({ file: { driver: 5 } }), invalidType('file.driver', 'string'));
    await add(
      raw({ file: { ...file(), bogus: 1 } }),
      generic("Parameter 'file.bogus' is unexpected"),
    );
    for (const bad of [5, null, true, ['x']]) {
      await add(raw({ file: bad }), invalidType('file', 'BlockdevRef'));
    }
    const qcow2 = (extra: object) => ({
      driver: 'qcow2',
      'node-name': 'n1',
      file: file(),
      ...extra,
    });
    await add(qcow2({ backing: 5 }), invalidType('backing', 'BlockdevRefOrNull'));
    await add(
      qcow2({ backing: { driver: 'file', filename: 5 } }),
      invalidType('backing.filename', 'string'),
    );
    await add(qcow2({ 'lazy-refcounts': 'on' }), invalidType('lazy-refcounts', 'boolean'));
    await add(qcow2({ 'cache-size': '1' }), invalidType('cache-size', 'integer'));
    await add(
      { driver: 'file', 'node-name': 'n1', filename: image, aio: 5 },
      invalidType('aio', 'string'),
    );
    await add(
      { driver: 'file', 'node-name': 'n1', filename: image, aio: 'fast' },
      generic("Parameter 'aio' does not accept value 'fast'"),
    );
    await add({ driver: 'null-co', 'node-name': 'n1', size: '5' }, invalidType('size', 'integer'));
    await add(
      { driver: 'throttle', 'node-name': 'n1', 'throttle-group': 5, file: file() },
      invalidType('throttle-group', 'string'),
    );
    await add(
      { driver: 'blkdebug', 'node-name': 'n1', image: file(), align: '512' },
      invalidType('align', 'integer'),
    );
    await add(
      { driver: 'blkdebug', 'node-name': 'n1', image: file(), 'inject-error': { errno: 5 } },
      invalidType('inject-error', 'array'),
    );
    await add(
      { driver: 'blkdebug', 'node-name': 'n1', image: file(), 'inject-error': [5] },
      invalidType('inject-error[0]', 'object'),
    );
    const nbd = (server: unknown) => ({ driver: 'nbd', 'node-name': 'n1', server });
    await add(
      nbd({ type: 'inet', host: '127.0.0.1', port: 10809 }),
      invalidType('server.port', 'string'),
    );
    await add(
      nbd({ type: 'inet', host: '127.0.0.1' }),
      generic("Parameter 'server.port' is missing"),
    );
    await add(nbd({ type: 'unix', path: 5 }), invalidType('server.path', 'string'));
    await add(
      nbd({ type: 'unix', path: '/x', bogus: 1 }),
      generic("Parameter 'server.bogus' is unexpected"),
    );
    await add(nbd(5), invalidType('server', 'object'));
    await add({ driver: 'nbd', 'node-name': 'n1' }, generic("Parameter 'server' is missing"));
    await add({ ...nbd({ type: 'unix', path: '/x' }), export: 5 }, invalidType('export', 'string'));
    // Right types do open (and the node goes again).
    await both('blockdev-add', raw({}), { return: {} });
    await both('blockdev-del', { 'node-name': 'n1' }, { return: {} });
  });

  it('nbd-server-start, block-export-add, block-export-del', async () => {
    const unix = (extra: object = {}) => ({
      addr: { type: 'unix', data: { path: join(dir, 'nbd.sock') } },
      ...extra,
    });
    const start = (args: unknown, expected: QmpMessage) => both('nbd-server-start', args, expected);
    await start(
      { addr: { type: 'unix', data: { path: 5 } } },
      invalidType('addr.data.path', 'string'),
    );
    await start(
      { addr: { type: 'unix', data: {} } },
      generic("Parameter 'addr.data.path' is missing"),
    );
    await start(
      { addr: { type: 'unix', data: { path: '/x', bogus: 2 } } },
      generic("Parameter 'addr.data.bogus' is unexpected"),
    );
    await start(
      { addr: { type: 'unix', data: { path: '/x' }, bogus: 2 } },
      generic("Parameter 'addr.bogus' is unexpected"),
    );
    await start({ addr: { type: 5, data: {} } }, invalidType('addr.type', 'string'));
    await start({ addr: 5 }, invalidType('addr', 'object'));
    await start(
      { addr: { type: 'inet', data: { host: '127.0.0.1', port: 10899 } } },
      invalidType('addr.data.port', 'string'),
    );
    await start({ bogus: 1 }, generic("Parameter 'addr' is missing"));
    await start(unix({ bogus: 1, 'tls-creds': 5 }), invalidType('tls-creds', 'string'));
    for (const n of ['4', 1.5, true]) {
      await start(
        unix({ 'max-connections': n }),
        generic("Parameter 'max-connections' expects uint64"),
      );
    }
    for (const n of [-1, 2 ** 32]) {
      await start(
        unix({ 'max-connections': n }),
        generic("Parameter 'max-connections' expects uint32_t"),
      );
    }

    const exp = (extra: object) => ({ type: 'nbd', id: 'e1', 'node-name': 'n1', ...extra });
    const add = (args: unknown, expected: QmpMessage) => both('block-export-add', args, expected);
    await add(exp({ writable: 'yes' }), invalidType('writable', 'boolean'));
    await add(exp({ writable: 1 }), invalidType('writable', 'boolean'));
    await add(exp({ 'allocation-depth': 1 }), invalidType('allocation-depth', 'boolean'));
    await add(exp({ writethrough: 'x' }), invalidType('writethrough', 'boolean'));
    await add(exp({ id: 5 }), invalidType('id', 'string'));
    await add(exp({ name: 5 }), invalidType('name', 'string'));
    await add(exp({ description: 5 }), invalidType('description', 'string'));
    await add(exp({ type: 5 }), invalidType('type', 'string'));
    await add(exp({ type: 'vhost' }), generic("Parameter 'type' does not accept value 'vhost'"));
    await add({ id: 'e1', 'node-name': 'n1' }, generic("Parameter 'type' is missing"));
    await add({ type: 'nbd', 'node-name': 'n1' }, generic("Parameter 'id' is missing"));
    await add({ type: 'nbd', id: 'e1' }, generic("Parameter 'node-name' is missing"));
    await add(exp({ bogus: 5, writable: 'x' }), invalidType('writable', 'boolean'));

    const del = (args: unknown, expected: QmpMessage) => both('block-export-del', args, expected);
    await del({ id: 5 }, invalidType('id', 'string'));
    await del({ id: 'e1', mode: 5 }, invalidType('mode', 'string'));
    await del({ id: 'e1', mode: 'soft' }, generic("Parameter 'mode' does not accept value 'soft'"));
    await del({}, generic("Parameter 'id' is missing"));
  });

  it('blockdev-create, blockdev-del, jobs, queries and the monitor commands', async () => {
    const create = (options: unknown, expected: QmpMessage) =>
      both('blockdev-create', { 'job-id': 'j1', options }, expected);
    const target = join(dir, 'created.img');
    await both(
      'blockdev-create',
      { 'job-id': 5, options: { driver: 'file', filename: target, size: 1 } },
      invalidType('job-id', 'string'),
    );
    await both('blockdev-create', { 'job-id': 'j1' }, generic("Parameter 'options' is missing"));
    await create(5, invalidType('options', 'object'));
    await create({}, generic("Parameter 'options.driver' is missing"));
    await create(
      { driver: 'file', filename: target, size: '1024' },
      generic("Parameter 'options.size' expects uint64"),
    );
    await create(
      { driver: 'file', filename: 5, size: 1 },
      invalidType('options.filename', 'string'),
    );
    await create(
      { driver: 'file', filename: target },
      generic("Parameter 'options.size' is missing"),
    );
    await create(
      { driver: 'file', filename: target, size: 1, nocow: 'x' },
      invalidType('options.nocow', 'boolean'),
    );
    const qcow2 = (extra: object) => ({ driver: 'qcow2', file: 'n1', size: 1, ...extra });
    await create(
      qcow2({ 'cluster-size': '65536' }),
      generic("Parameter 'options.cluster-size' expects uint64"),
    );
    await create(
      qcow2({ 'lazy-refcounts': 'on' }),
      invalidType('options.lazy-refcounts', 'boolean'),
    );
    await create(qcow2({ 'refcount-bits': '16' }), invalidType('options.refcount-bits', 'integer'));
    await create(qcow2({ 'backing-file': 5 }), invalidType('options.backing-file', 'string'));
    await create(qcow2({ bogus: 1 }), generic("Parameter 'options.bogus' is unexpected"));

    await both('blockdev-del', { 'node-name': 5 }, invalidType('node-name', 'string'));
    await both('blockdev-del', {}, generic("Parameter 'node-name' is missing"));
    await both('blockdev-del', { 'node-name': 'n1', x: 1 }, generic("Parameter 'x' is unexpected"));
    await both('job-cancel', { id: 'j', force: true }, generic("Parameter 'force' is unexpected"));
    for (const job of [
      'job-cancel',
      'job-pause',
      'job-resume',
      'job-complete',
      'job-finalize',
      'job-dismiss',
    ]) {
      await both(job, { id: 5 }, invalidType('id', 'string'));
      await both(job, {}, generic("Parameter 'id' is missing"));
    }
    await both('query-named-block-nodes', { flat: 'yes' }, invalidType('flat', 'boolean'));
    await both('query-version', { x: 1 }, generic("Parameter 'x' is unexpected"));
    await both('quit', { x: 1 }, generic("Parameter 'x' is unexpected"));
    await both('qmp_capabilities', { enable: 'oob' }, invalidType('enable', 'array'));
  });

  it('names a nested enum member by its last part, as QEMU does', async () => {
    expect(
      await ours.execute({
        execute: 'blockdev-add',
        arguments: { driver: 'nbd', 'node-name': 'n1', server: { type: 'xx' } },
      }),
    ).toEqual(generic("Parameter 'type' does not accept value 'xx'"));
    expect(
      await theirs.execute({
        execute: 'blockdev-add',
        arguments: { driver: 'nbd', 'node-name': 'n1', server: { type: 'xx' } },
      }),
    ).toEqual(generic("Parameter 'type' does not accept value 'xx'"));
  });
});

/** Runs a daemon that must fail to start; resolves with its exit status and last line. */
async function failsToStart(
  command: string,
  args: string[],
): Promise<{ status: number | string; message: string }> {
  const p = start(command, args);
  processes.push(p);
  const status = await p.exited;
  const lines = p.stderr().trim().split('\n');
  const last = lines[lines.length - 1] as string;
  // qemu-storage-daemon: --blockdev VALUE: MESSAGE / vm-disk: MESSAGE (CODE)
  const message = last
    .replace(/^qemu-storage-daemon: --blockdev .*?: (?=Invalid|Parameter|')/, '')
    .replace(/^vm-disk: /, '')
    .replace(/ \(ERR_[A-Z_]+\)$/, '');
  return { status, message };
}

describe('--blockdev on the command line, as qemu-storage-daemon parses it', () => {
  it('types JSON values as QMP does, and converts keyval strings', async () => {
    const cases: [string, string][] = [
      [
        JSON.stringify({ driver: 'file', 'node-name': 'n1', filename: image, 'read-only': 'on' }),
        "Invalid parameter type for 'read-only', expected: boolean",
      ],
      [
        JSON.stringify({ driver: 'raw', 'node-name': 'n1', file: { driver: 'file', filename: 5 } }),
        "Invalid parameter type for 'file.filename', expected: string",
      ],
      [
        JSON.stringify({ driver: 'raw', 'node-name': 'n1', offset: '512', file: file() }),
        "Invalid parameter type for 'offset', expected: integer",
      ],
      [
        `driver=file,node-name=n1,filename=${image},read-only=maybe`,
        "Parameter 'read-only' expects 'on' or 'off'",
      ],
      [
        `driver=raw,node-name=n1,offset=1k,file.driver=file,file.filename=${image}`,
        "Parameter 'offset' expects integer",
      ],
      [
        `driver=raw,node-name=n1,file.driver=file,file.filename=${image},file.cache.direct=x`,
        "Parameter 'file.cache.direct' expects 'on' or 'off'",
      ],
      [`driver=raw,node-name=n1,file.driver=file`, "Parameter 'file.filename' is missing"],
      [`driver=file,filename=${image}`, "'node-name' must be specified for the root node"],
    ];
    for (const [value, message] of cases) {
      const mine = await failsToStart(process.execPath, [CLI, 'serve', '--blockdev', value]);
      const reference = await failsToStart('qemu-storage-daemon', ['--blockdev', value]);
      expect(reference, `qemu-storage-daemon --blockdev ${value}`).toEqual({ status: 1, message });
      expect(mine, `vm-disk serve --blockdev ${value}`).toEqual({ status: 1, message });
    }
    // The same values as keyval strings are converted.
    const qmp = join(dir, 'keyval.qmp');
    const p = await startServe([
      ...monitorArgs(qmp),
      '--blockdev',
      `driver=raw,node-name=kv,read-only=on,offset=512,size=4096,file.driver=file,file.filename=${image},file.cache.direct=off`,
    ]);
    processes.push(p);
    const client = await negotiated(qmp);
    try {
      const nodes = (await client.execute({ execute: 'query-named-block-nodes' })).return as {
        'node-name': string;
        ro: boolean;
        offset?: number;
        size?: number;
      }[];
      expect(nodes.find((n) => n['node-name'] === 'kv')).toMatchObject({ ro: true, offset: 512 });
    } finally {
      client.close();
    }
  });
});
