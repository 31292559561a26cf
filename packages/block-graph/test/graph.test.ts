import { readlinkSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { type AddOptions, BlockError, BlockGraph, BlockOptionError } from '../src/index.ts';
import { tempDir } from './helpers.ts';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

function img(name: string, size = 1 << 20): string {
  const path = tmp.file(name, Buffer.alloc(size));
  return path;
}

async function rejectsKey(
  g: BlockGraph,
  options: unknown,
  key: string,
  code = 'ERR_VMDISK_BLOCK_BAD_OPTION',
  how: AddOptions = {},
) {
  const err = await g.add(options, how).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(BlockError);
  expect(err).toMatchObject({ code, key });
  expect((err as Error).message).toContain(key);
}

describe('building graphs from blockdev-add options', () => {
  it('builds children inline and by name, auto-names inline nodes, queries them, tears down', async () => {
    const path = img('a.img');
    const g = new BlockGraph();
    await g.add({ driver: 'file', 'node-name': 'proto', filename: path });
    await g.add({ driver: 'raw', 'node-name': 'disk0', file: 'proto' });
    await g.add({
      driver: 'throttle',
      'node-name': 'thr',
      limits: { 'iops-total': 1000 },
      file: { driver: 'raw', file: { driver: 'file', filename: img('b.img', 65536) } },
    });
    const q = g.query();
    expect(q.map((n) => n['node-name']).sort()).toEqual([
      '#block001',
      '#block002',
      'disk0',
      'proto',
      'thr',
    ]);
    const disk0 = q.find((n) => n['node-name'] === 'disk0')!;
    expect(disk0).toMatchObject({ driver: 'raw', size: 1 << 20, 'read-only': false, refcount: 1 });
    expect(disk0.children).toEqual([
      expect.objectContaining({
        child: 'file',
        'node-name': 'proto',
        role: ['data', 'filtered', 'primary'],
      }),
    ]);
    const proto = q.find((n) => n['node-name'] === 'proto')!;
    expect(proto.refcount).toBe(2); // the user's and disk0's
    expect(proto.file).toBe(path);
    const inlineRaw = q.find((n) => n['node-name'].startsWith('#') && n.driver === 'raw')!;
    expect(inlineRaw.children[0]!['node-name']).toMatch(/^#block/);
    expect(inlineRaw.refcount).toBe(1);
    // Inline nodes go with their parent; named nodes in use cannot be removed (QEMU's words).
    await expect(g.del('#block001')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_NODE_IN_USE',
      message: 'Node #block001 is not owned by the monitor',
    });
    await expect(g.del('proto')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_NODE_IN_USE',
      errnoName: 'EBUSY',
      message: 'Block device proto is in use',
    });
    await g.del('thr');
    expect(
      g
        .query()
        .map((n) => n['node-name'])
        .sort(),
    ).toEqual(['disk0', 'proto']);
    await g.del('disk0');
    expect(g.query().find((n) => n['node-name'] === 'proto')!.refcount).toBe(1);
    await g.del('proto');
    expect(g.query()).toEqual([]);
    await expect(g.del('proto')).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_NODE_NOT_FOUND' });
    await g.close();
  });

  it('rejects bad options naming the key and why, and leaves nothing behind', async () => {
    const path = img('c.img');
    const g = new BlockGraph();
    // QEMU's order: missing and mistyped members first, unknown ones last.
    await rejectsKey(
      g,
      { driver: 'raw', file: { driver: 'file', filname: path } },
      'file.filename',
    );
    await rejectsKey(
      g,
      { driver: 'raw', file: { driver: 'file', filename: path, filname: path } },
      'file.filname',
    );
    await rejectsKey(g, { driver: 'raw', file: { driver: 'file' } }, 'file.filename');
    await rejectsKey(g, { driver: 'raw' }, 'file');
    await rejectsKey(g, { 'node-name': 'x' }, 'driver');
    await rejectsKey(g, { driver: 'qcow7' }, 'driver', 'ERR_VMDISK_BLOCK_UNKNOWN_DRIVER');
    await rejectsKey(g, { driver: 'null-co', size: 'big' }, 'size');
    await rejectsKey(g, { driver: 'null-co', size: -1 }, 'size');
    await rejectsKey(g, { driver: 'null-co', 'node-name': '1abc' }, 'node-name');
    await rejectsKey(g, { driver: 'null-co', 'read-only': 1 }, 'read-only');
    await rejectsKey(
      g,
      { driver: 'null-co', cache: { direct: true, writeback: true } },
      'cache.writeback',
    );
    await rejectsKey(g, { driver: 'null-co', discard: 'sometimes' }, 'discard');
    await rejectsKey(g, { driver: 'null-co', 'detect-zeroes': 'always' }, 'detect-zeroes');
    await rejectsKey(g, { driver: 'file', filename: path, aio: 'fast' }, 'aio');
    await rejectsKey(
      g,
      { driver: 'raw', file: 'nosuch' },
      'file',
      'ERR_VMDISK_BLOCK_NODE_NOT_FOUND',
    );
    await rejectsKey(
      g,
      {
        driver: 'throttle',
        limits: { 'iops-total': 10, 'iops-read': 5 },
        file: { driver: 'null-co' },
      },
      'limits.iops-total',
    );
    await rejectsKey(
      g,
      { driver: 'throttle', limits: { 'bps-turbo': 10 }, file: { driver: 'null-co' } },
      'limits.bps-turbo',
    );
    await rejectsKey(
      g,
      { driver: 'blkdebug', 'inject-error': [{ errno: 'EWHAT' }], image: { driver: 'null-co' } },
      'inject-error[0].errno',
    );
    await rejectsKey(g, { driver: 'blkdebug', align: 3, image: { driver: 'null-co' } }, 'align');
    await rejectsKey(
      g,
      { driver: 'bochs', 'read-only': false, file: { driver: 'null-co' } },
      'read-only',
    );
    // A file that does not exist: an I/O error with errno, and nothing left behind.
    const err = await g
      .add({ driver: 'raw', file: { driver: 'file', filename: tmp.path('missing.img') } })
      .catch((e) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'ENOENT', errno: 2 });
    expect(err.syscall).toBeTypeOf('string');
    expect(g.query()).toEqual([]);
    // Duplicate names, also inside one request: QEMU's words, the key in `key`.
    await g.add({ driver: 'null-co', 'node-name': 'n1' });
    const dup = async (opts: Record<string, unknown>, key: string, name: string) => {
      const e = await g.add(opts).catch((x: unknown) => x);
      expect(e).toMatchObject({ code: 'ERR_VMDISK_BLOCK_DUPLICATE_NODE', key });
      expect((e as Error).message).toBe(`Duplicate nodes with node-name='${name}'`);
    };
    await dup({ driver: 'null-co', 'node-name': 'n1' }, 'node-name', 'n1');
    await dup(
      { driver: 'raw', 'node-name': 'n2', file: { driver: 'null-co', 'node-name': 'n2' } },
      'file.node-name',
      'n2',
    );
    expect(g.query().map((n) => n['node-name'])).toEqual(['n1']);
    expect(new BlockOptionError('a.b', 'why').code).toBe('ERR_VMDISK_BLOCK_BAD_OPTION');
    await g.close();
  });

  it('takes the strings of the keyval command-line syntax for ints, bools and lists', async () => {
    const path = img('kv.img', 65536);
    const g = new BlockGraph();
    const keyval = { syntax: 'keyval' } as const;
    await g.add(
      {
        driver: 'raw',
        'node-name': 'kv',
        'read-only': 'on',
        offset: '512',
        size: '4096',
        file: { driver: 'file', filename: path, cache: { direct: 'off', 'no-flush': 'no' } },
      },
      keyval,
    );
    const kv = g.query().find((n) => n['node-name'] === 'kv')!;
    expect(kv).toMatchObject({ size: 4096, 'read-only': true, offset: 512 });
    await g.add(
      {
        driver: 'blkdebug',
        'node-name': 'dbg',
        align: '512',
        'inject-error': {
          '0': { iotype: 'read', errno: '5', once: 'on', offset: '0', length: '512' },
        },
        image: { driver: 'throttle', limits: { 'iops-total': '100000' }, file: 'kv' },
      },
      keyval,
    );
    const b = await g.createBackend('dbg');
    await expect(b.read(0, Buffer.alloc(512))).rejects.toMatchObject({ errnoName: 'EIO' });
    await b.read(0, Buffer.alloc(512));
    await rejectsKey(g, { driver: 'null-co', size: '12x' }, 'size', undefined, keyval);
    await rejectsKey(
      g,
      { driver: 'null-co', 'read-only': 'maybe' },
      'read-only',
      undefined,
      keyval,
    );
    await rejectsKey(
      g,
      { driver: 'blkdebug', 'inject-error': { '1': {} }, image: { driver: 'null-co' } },
      'inject-error',
      undefined,
      keyval,
    );
    await rejectsKey(
      g,
      { driver: 'blkdebug', 'inject-error': [{ once: 'sometimes' }], image: { driver: 'null-co' } },
      'inject-error[0].once',
      undefined,
      keyval,
    );
    // The same strings in JSON (QMP) are of the wrong type.
    await rejectsKey(g, { driver: 'null-co', size: '4096' }, 'size');
    await rejectsKey(g, { driver: 'null-co', 'read-only': 'on' }, 'read-only');
    await g.close();
  });

  it('auto-read-only opens read-only what cannot be opened for writing', async () => {
    // A sysfs file root can read but not open for writing (EACCES even for root).
    const path = '/sys/kernel/notes';
    const g = new BlockGraph();
    const err = await g
      .add({ driver: 'raw', file: { driver: 'file', filename: path } })
      .catch((e) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'EACCES' });
    expect(g.query()).toEqual([]);
    await g.add({
      driver: 'raw',
      'node-name': 'notes',
      'auto-read-only': true,
      file: { driver: 'file', 'node-name': 'notes-file', filename: path },
    });
    const q = g.query();
    expect(q.find((n) => n['node-name'] === 'notes-file')!['read-only']).toBe(true);
    expect(q.find((n) => n['node-name'] === 'notes')!['read-only']).toBe(true);
    await expect(g.createBackend('notes', { write: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT',
    });
    const b = await g.createBackend('notes');
    const buf = Buffer.alloc(Math.min(16, b.size()));
    await b.read(0, buf);
    expect(buf.byteLength).toBeGreaterThan(0);
    // A writable file stays writable with auto-read-only.
    await g.add({
      driver: 'file',
      'node-name': 'rw',
      'auto-read-only': true,
      filename: img('aro.img'),
    });
    expect(g.query().find((n) => n['node-name'] === 'rw')!['read-only']).toBe(false);
    await g.close();
  });

  it('inherits read-only and cache settings into inline children', async () => {
    const g = new BlockGraph();
    await g.add({
      driver: 'raw',
      'node-name': 'ro',
      'read-only': true,
      file: { driver: 'file', 'node-name': 'f', filename: img('d.img') },
    });
    expect(g.query().find((n) => n['node-name'] === 'f')!['read-only']).toBe(true);
    await expect(g.createBackend('ro', { write: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT',
    });
    const b = await g.createBackend('ro');
    await expect(b.write(0, Buffer.alloc(1))).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_READ_ONLY',
      errnoName: 'EPERM',
    });
    await g.close();
  });
});

describe('permissions', () => {
  it('refuses a writer where another user does not share write, and a second user of a format file', async () => {
    const g = new BlockGraph();
    await g.add({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', 'node-name': 'f', filename: img('p.img') },
    });
    const writer = await g.createBackend('disk', { name: 'export0', write: true });
    const reader = await g.createBackend('disk', { name: 'reader', shareWrite: true });
    // Another writer: export0 does not share 'write'.
    const err = await g.createBackend('disk', { name: 'job', write: true }).catch((e) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT', errnoName: 'EPERM' });
    // QEMU's words: a BlockBackend is "an unnamed block device" (as qemu-storage-daemon's).
    expect(err.message).toBe(
      "Permission conflict on node 'disk': permissions 'write' are both required by an unnamed block device (uses node 'disk' as 'root' child) and unshared by an unnamed block device (uses node 'disk' as 'root' child).",
    );
    // Sharing on both sides works.
    await writer.close();
    const w1 = await g.createBackend('disk', { write: true, shareWrite: true });
    const w2 = await g.createBackend('disk', { write: true, shareWrite: true });
    await w1.close();
    await w2.close();
    await reader.close();
    // A bochs node owns its file's metadata: nobody else may write that file.
    const bochsLike = await g.add({
      driver: 'raw',
      'node-name': 'win',
      offset: 0,
      size: 4096,
      file: 'f',
    });
    expect(bochsLike.name).toBe('win');
    const info = g.query().find((n) => n['node-name'] === 'f')!;
    expect(info.parents.map((p) => p.parent).sort()).toEqual(['disk', 'win']);
    // The edge a format takes carries the permissions its users want, passed down.
    const b = await g.createBackend('win', { write: true });
    const fInfo = g.query().find((n) => n['node-name'] === 'f')!;
    expect(fInfo.perm).toContain('write');
    await b.close();
    expect(g.query().find((n) => n['node-name'] === 'f')!.perm).not.toContain('write');
    await g.close();
  });

  it('refuses permissions a read-only node below cannot give, and undoes the attach', async () => {
    const g = new BlockGraph();
    await g.add({ driver: 'file', 'node-name': 'f', 'read-only': true, filename: img('q.img') });
    await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
    const err = await g.createBackend('r', { write: true }).catch((e) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT' });
    expect(err.message).toBe('Block node is read-only'); // QEMU's bdrv_node_check_perm
    expect(g.query().find((n) => n['node-name'] === 'r')!.parents).toEqual([]);
    const rb = await g.createBackend('r');
    expect(rb.writable).toBe(false);
    await g.close();
  });
});

describe('refcounts', () => {
  it('the last reference closes the files', async () => {
    const path = img('rc.img');
    const g = new BlockGraph();
    await g.add({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: path } });
    const fd = g.query().find((n) => n.driver === 'file')!.fd as number;
    const fdPath = () => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        return undefined;
      }
    };
    expect(fdPath()).toBe(path);
    const b = await g.createBackend('disk');
    expect(g.query().find((n) => n['node-name'] === 'disk')!.refcount).toBe(2);
    await expect(g.del('disk')).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_NODE_IN_USE' });
    expect(fdPath()).toBe(path);
    await b.close();
    await expect(b.read(0, Buffer.alloc(1))).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_CLOSED',
    });
    expect(fdPath()).toBe(path);
    await g.del('disk');
    expect(fdPath()).not.toBe(path);
    expect(g.query()).toEqual([]);
    await g.close();
  });

  it('replacing a child drops the old one, which closes when nothing else holds it', async () => {
    const a = img('ra.img');
    const b = img('rb.img');
    const g = new BlockGraph();
    await g.add({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', 'node-name': 'fa', filename: a },
    });
    await g.add({ driver: 'file', 'node-name': 'fb', filename: b });
    await g.replaceChild('disk', 'file', 'fb');
    expect(g.hasNode('fa')).toBe(false);
    expect(g.query().find((n) => n['node-name'] === 'fb')!.refcount).toBe(2);
    await expect(g.replaceChild('disk', 'backing', 'fb')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_GRAPH_CHANGE',
    });
    // A cycle is refused and changes nothing.
    await g.add({ driver: 'raw', 'node-name': 'top', file: 'disk' });
    await expect(g.replaceChild('disk', 'file', 'top')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_GRAPH_CHANGE',
    });
    expect(g.query().find((n) => n['node-name'] === 'disk')!.children[0]!['node-name']).toBe('fb');
    await g.close();
    expect(g.query()).toEqual([]);
  });
});
