// Dirty bitmaps offered as meta contexts qemu:dirty-bitmap:NAME (QEMU's block-export-add
// `bitmaps`): listed and selected as qemu-storage-daemon 7.2 answers, block status with
// flag 1 on the dirty extents; nbdinfo and nbdsh (libnbd) as independent peers, then our
// client with structured replies and with extended headers.
import { execFile } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BitmapExtent, type ExportBitmap, MemoryTarget, NbdClient } from '../src/index.ts';
import { run, type Started, startServer } from './server-helpers.ts';

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 4 * MiB;

/**
 * A bitmap of `granularity` with the granules touching `dirty` ranges set; its status is
 * QEMU's bitmap_to_extents: from the offset asked for, a dirty range ends where a clean
 * granule starts.
 */
function testBitmap(
  name: string,
  granularity: number,
  dirty: Array<[number, number]>,
): ExportBitmap {
  const bits = new Set<number>();
  for (const [o, n] of dirty) {
    for (let g = Math.floor(o / granularity); g * granularity < o + n; g++) bits.add(g);
  }
  return {
    name,
    status(offset, length) {
      const out: BitmapExtent[] = [];
      const end = offset + length;
      for (let pos = offset; pos < end; ) {
        const isDirty = bits.has(Math.floor(pos / granularity));
        const next = Math.min(end, (Math.floor(pos / granularity) + 1) * granularity);
        const last = out[out.length - 1];
        if (last?.dirty === isDirty) last.length += next - pos;
        else out.push({ length: next - pos, dirty: isDirty });
        pos = next;
      }
      return out;
    },
  };
}

/** nbdsh (libnbd's python) from the system's python, which has the nbd module. */
function nbdsh(script: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      'nbdsh',
      ['-c', script],
      { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } },
      (err, stdout, stderr) =>
        err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout),
    );
  });
}

/** The contexts NBD_OPT_LIST_META_CONTEXT answers for each list of queries (libnbd's). */
async function listContexts(uri: string, queryLists: string[][]): Promise<string[][]> {
  const out = await nbdsh(
    [
      'import json',
      'answers = []',
      `for queries in ${JSON.stringify(queryLists)}:`,
      '    h = nbd.NBD()',
      '    h.set_opt_mode(True)',
      '    for q in queries: h.add_meta_context(q)',
      `    h.connect_uri(${JSON.stringify(uri)})`,
      '    seen = []',
      '    h.opt_list_meta_context(lambda name: seen.append(name))',
      '    h.opt_abort()',
      '    answers.append(seen)',
      'print(json.dumps(answers))',
    ].join('\n'),
  );
  return JSON.parse(out);
}

/** One BLOCK_STATUS through libnbd: {context: [length, flags, ...]}. */
async function libnbdStatus(
  uri: string,
  contexts: string[],
  offset: number,
  length: number,
  reqOne = false,
): Promise<Record<string, number[]>> {
  const out = await nbdsh(
    [
      'import json',
      'h.set_opt_mode(True)',
      `for c in ${JSON.stringify(contexts)}: h.add_meta_context(c)`,
      `h.connect_uri(${JSON.stringify(uri)})`,
      'h.opt_go()',
      'got = {}',
      'def cb(ctx, off, ents, err):',
      '    got[ctx] = ents',
      '    return 0',
      `h.block_status(${length}, ${offset}, cb${reqOne ? ', nbd.CMD_FLAG_REQ_ONE' : ''})`,
      'print(json.dumps(got))',
    ].join('\n'),
  );
  return JSON.parse(out);
}

describe('dirty bitmaps as qemu:dirty-bitmap:NAME', () => {
  let s: Started;
  // Dirty as QEMU's b0 after writes of 5000 at 100000, 200 KiB at 1 MiB, 1000 at 4190000.
  const b0 = testBitmap('b0', 64 * KiB, [
    [100000, 5000],
    [MiB, 200 * KiB],
    [4190000, 1000],
  ]);
  const b1 = testBitmap('b1', 4 * KiB, [[8 * KiB, 1]]);

  beforeAll(async () => {
    s = await startServer([
      { name: 'bm', target: new MemoryTarget(SIZE), dirtyBitmaps: [b0, b1] },
      { name: 'twice', target: new MemoryTarget(SIZE), dirtyBitmaps: [b1, b1] },
      { name: 'plain', target: new MemoryTarget(SIZE) },
    ]);
  });
  afterAll(async () => {
    await s?.server.close();
  });

  it('lists them as qemu-storage-daemon 7.2 does, for each kind of query', async () => {
    const bitmaps = ['qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b1'];
    const queries = [
      [],
      ['qemu:'],
      ['qemu:dirty-bitmap:'],
      ['qemu:dirty-bitmap:b1'],
      ['qemu:dirty-bitmap:nope'],
      ['qemu:dirty-bitmap:b'],
      ['base:'],
    ];
    expect(await listContexts(s.uri('bm'), queries)).toEqual([
      ['base:allocation', ...bitmaps],
      bitmaps,
      bitmaps,
      [bitmaps[1]],
      [],
      [],
      ['base:allocation'],
    ]);
    expect(await listContexts(s.uri('plain'), [['qemu:']])).toEqual([[]]);
    // A bitmap exported twice is listed twice (QEMU allows it).
    expect(await listContexts(s.uri('twice'), [['qemu:dirty-bitmap:']])).toEqual([
      [bitmaps[1], bitmaps[1]],
    ]);
  });

  it('nbdinfo --map=qemu:dirty-bitmap:NAME lists the dirty granules', async () => {
    const r = await run('nbdinfo', ['--map=qemu:dirty-bitmap:b0', '--json', s.uri('bm')]);
    expect(r.code).toBe(0);
    const got = (
      JSON.parse(r.stdout) as Array<{
        offset: number;
        length: number;
        type: number;
        description: string;
      }>
    ).map((e) => [e.offset, e.length, e.type, e.description]);
    // What nbdinfo showed against qemu-storage-daemon 7.2 after the same writes.
    expect(got).toEqual([
      [0, 65536, 0, 'clean'],
      [65536, 65536, 1, 'dirty'],
      [131072, 917504, 0, 'clean'],
      [1048576, 262144, 1, 'dirty'],
      [1310720, 2818048, 0, 'clean'],
      [4128768, 65536, 1, 'dirty'],
    ]);
    const one = await run('nbdinfo', ['--map=qemu:dirty-bitmap:b1', '--json', s.uri('bm')]);
    expect(JSON.parse(one.stdout)).toHaveLength(3);
  });

  it('answers block status beside base:allocation, cut to the range, REQ_ONE honoured', async () => {
    const uri = s.uri('bm');
    const ctx = ['qemu:dirty-bitmap:b0', 'base:allocation'];
    // The descriptors qemu-storage-daemon 7.2 sent for the same requests.
    expect(await libnbdStatus(uri, ctx, 1000000, 70000)).toEqual({
      'qemu:dirty-bitmap:b0': [48576, 0, 21424, 1],
      'base:allocation': [70000, 3],
    });
    expect(await libnbdStatus(uri, ctx, 300000, 1000000, true)).toEqual({
      'qemu:dirty-bitmap:b0': [748576, 0],
      'base:allocation': [1000000, 3],
    });
    const whole = await libnbdStatus(uri, ['qemu:dirty-bitmap:b0'], 194304, 4000000);
    expect(whole).toEqual({
      'qemu:dirty-bitmap:b0': [854272, 0, 262144, 1, 2818048, 0, 65536, 1],
    });
    expect(await libnbdStatus(uri, ['qemu:dirty-bitmap:b0'], 10000, 140000)).toEqual({
      'qemu:dirty-bitmap:b0': [55536, 0, 65536, 1, 18928, 0],
    });
  });

  for (const extendedHeaders of [false, true]) {
    it(`our client reads it (extended headers ${extendedHeaders})`, async () => {
      const c = await NbdClient.connect(s.uri('bm'), {
        metaContexts: ['qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:nope'],
        extendedHeaders,
      });
      try {
        expect(c.extendedHeaders).toBe(extendedHeaders);
        expect(c.metaContexts).toEqual(['base:allocation', 'qemu:dirty-bitmap:b1']);
        const got = await c.blockStatus(0, SIZE);
        const dirty = got.get('qemu:dirty-bitmap:b1')!.map((e) => [e.length, e.dirty, e.flags]);
        expect(dirty).toEqual([
          [8 * KiB, false, 0],
          [4 * KiB, true, 1],
          [SIZE - 12 * KiB, false, 0],
        ]);
        const one = await c.blockStatus(4 * KiB, 8 * KiB, { reqOne: true });
        expect(one.get('qemu:dirty-bitmap:b1')!.map((e) => [e.length, e.dirty])).toEqual([
          [4 * KiB, false],
        ]);
      } finally {
        await c.close();
      }
    });
  }

  it('a client selecting a bitmap exported twice gets it once', async () => {
    const c = await NbdClient.connect(s.uri('twice'), {
      baseAllocation: false,
      metaContexts: ['qemu:dirty-bitmap:b1'],
    });
    try {
      expect(c.metaContexts).toEqual(['qemu:dirty-bitmap:b1']);
      const got = await c.blockStatus(8 * KiB, 4 * KiB);
      expect(got.get('qemu:dirty-bitmap:b1')!.map((e) => [e.length, e.dirty])).toEqual([
        [4 * KiB, true],
      ]);
    } finally {
      await c.close();
    }
  });

  it('refuses a bitmap without a name', () => {
    const bad = { ...b1, name: '' };
    expect(() =>
      s.server.addExport({ name: 'bad', target: new MemoryTarget(SIZE), dirtyBitmaps: [bad] }),
    ).toThrow(/dirtyBitmaps/);
  });
});

describe('REQ_ONE', () => {
  it('merges neighbours of the same state into the one descriptor, as QEMU', async () => {
    const mem = new MemoryTarget(MiB);
    // Two data extents, then a hole: QEMU's extent array merges the first two.
    const target = {
      size: () => mem.size(),
      read: (o: number, b: Uint8Array) => mem.read(o, b),
      blockStatus: async () => [
        { length: 64 * KiB, hole: false, zero: false },
        { length: 64 * KiB, hole: false, zero: false },
        { length: MiB - 128 * KiB, hole: true, zero: true },
      ],
    };
    const b = testBitmap('b', 64 * KiB, [[0, 1]]);
    const srv = await startServer([{ name: 'x', target, dirtyBitmaps: [b] }]);
    const c = await NbdClient.connect(srv.uri('x'), { metaContexts: ['qemu:dirty-bitmap:b'] });
    try {
      const got = await c.blockStatus(0, MiB, { reqOne: true });
      expect(got.get('base:allocation')!.map((e) => [e.length, e.flags])).toEqual([[128 * KiB, 0]]);
      expect(got.get('qemu:dirty-bitmap:b')!.map((e) => [e.length, e.flags])).toEqual([
        [64 * KiB, 1],
      ]);
    } finally {
      await c.close();
      await srv.server.close();
    }
  });
});
