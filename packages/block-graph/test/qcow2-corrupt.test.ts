// Corrupt and unsupported images fail with a clear error and a stable code: never a crash
// (TypeError, RangeError), never a hang.

import { open, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkQcow2, readHeader } from '../src/drivers/qcow2/check.ts';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { BlockError } from '../src/errors.ts';
import { ImageFile, rng } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

let n = 0;
/** A 4 MiB image with some data, made by qemu-img / qemu-io. */
async function image(
  opts = 'cluster_size=65536',
  io: string[] = ['write -P 1 0 200k', 'write -P 2 3M 64k'],
): Promise<string> {
  const path = join(dir, `i${n++}.qcow2`);
  await qemuImgCreate(path, '4M', { o: opts });
  await must('qemu-io', ['-f', 'qcow2', ...io.flatMap((c) => ['-c', c]), path]);
  return path;
}

async function poke(path: string, offset: number, bytes: number[] | Uint8Array): Promise<void> {
  const fh = await open(path, 'r+');
  await fh.write(Uint8Array.from(bytes), 0, bytes.length, offset);
  await fh.close();
}
async function peek(path: string, offset: number, length: number): Promise<Uint8Array> {
  const fh = await open(path, 'r');
  const b = new Uint8Array(length);
  await fh.read(b, 0, length, offset);
  await fh.close();
  return b;
}
function be64(v: number): number[] {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(v));
  return [...b];
}
function be32(v: number): number[] {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v);
  return [...b];
}

async function headerOf(path: string) {
  const f = await ImageFile.open(path, { readOnly: true });
  try {
    return await readHeader(f);
  } finally {
    await f.close();
  }
}

/** Opens (read-write unless told) and reads the whole disk; returns the error thrown. */
async function tryAll(path: string, readOnly = false): Promise<unknown> {
  const f = await ImageFile.open(path, { readOnly });
  try {
    const img = await openQcow2(f, { readOnly, backing: null });
    const b = new Uint8Array(img.virtualSize);
    await img.read(b, 0);
    await img.blockStatus(0, img.virtualSize);
    if (!readOnly) {
      await img.write(new Uint8Array(70_000).fill(9), 1000);
      await img.write(new Uint8Array(5000).fill(9), 2 << 20);
      await img.discard(0, 1 << 20);
    }
    await img.close();
    return null;
  } catch (err) {
    return err;
  } finally {
    await f.close();
  }
}

function expectCode(err: unknown, code: string): void {
  expect(err).toBeInstanceOf(BlockError);
  expect((err as BlockError).code).toBe(code);
}

const BAD_HEADER = 'ERR_VMDISK_BLOCK_QCOW2_BAD_HEADER';
const CORRUPT = 'ERR_VMDISK_BLOCK_QCOW2_CORRUPT';
const UNSUPPORTED = 'ERR_VMDISK_BLOCK_QCOW2_UNSUPPORTED_FEATURE';

describe('qcow2 corrupt headers', () => {
  it('bad magic, cluster bits, refcount order, L1 size, header length', async () => {
    const cases: Array<[number, number[]]> = [
      [0, [0x51, 0x46, 0x49, 0]],
      [20, be32(22)],
      [20, be32(8)],
      [96, be32(7)],
      [36, be32(0)], // L1 too small for 4 MiB
      [100, be32(105)],
      [4, be32(4)],
      [56, be32(0)],
      [48, be64(12345)],
    ];
    for (const [off, bytes] of cases) {
      const path = await image();
      await poke(path, off, bytes);
      expectCode(await tryAll(path, true), BAD_HEADER);
    }
  });

  it('a file too short for a header', async () => {
    const path = join(dir, 'short.qcow2');
    await qemuImgCreate(path, '1M');
    await truncate(path, 50);
    expectCode(await tryAll(path, true), BAD_HEADER);
  });
});

describe('qcow2 refused features name the feature', () => {
  it('an unknown incompatible bit, named from the feature name table when there', async () => {
    const path = await image();
    await poke(path, 72, be64(1 << 7));
    const err = (await tryAll(path, true)) as { feature: string; message: string };
    expectCode(err, UNSUPPORTED);
    expect(err.feature).toContain('bit 7');
  });

  it('encryption', async () => {
    const path = await image();
    await poke(path, 32, be32(2));
    const err = (await tryAll(path, true)) as { feature: string };
    expectCode(err, UNSUPPORTED);
    expect(err.feature).toBe('encryption');
  });

  it('an external data file (made by qemu-img)', async () => {
    const path = join(dir, 'df.qcow2');
    await qemuImgCreate(path, '1M', { o: `data_file=${path}.data` });
    const err = (await tryAll(path, true)) as { feature: string };
    expectCode(err, UNSUPPORTED);
    expect(err.feature).toBe('external data file');
  });

  it('the compression type: unknown refused, the incompatible bit checked, as qemu-img does', async () => {
    // [incompatible bit 3 set, header byte 104, our code or null (opens)]; qemu-img says the same.
    const cases: Array<[boolean, number, string | null]> = [
      [true, 7, UNSUPPORTED],
      [false, 7, UNSUPPORTED],
      [false, 255, UNSUPPORTED],
      [false, 1, BAD_HEADER],
      [true, 0, BAD_HEADER],
      [true, 1, null], // zstd
    ];
    for (const [bit, type, code] of cases) {
      const path = await image();
      await poke(path, 79, [bit ? 8 : 0]);
      await poke(path, 104, [type]);
      const theirs = await run('qemu-img', ['info', path]);
      for (const readOnly of [true, false]) {
        const err = (await tryAll(path, readOnly)) as BlockError & { feature?: string };
        if (code === null) {
          expect(err).toBeNull();
          expect(theirs.code).toBe(0);
          continue;
        }
        expectCode(err, code);
        expect(theirs.code).toBe(1);
        expect(theirs.stderr).toContain(`: ${err.message}`);
        if (code === UNSUPPORTED) {
          expect(err.message).toBe(`qcow2: unknown compression type: ${type}`);
          expect(err.feature).toBe('compression type');
        }
      }
    }
  });

  it('the corrupt bit: read-only open allowed, read-write refused', async () => {
    const path = await image();
    await poke(path, 72, be64(2));
    expect(await tryAll(path, true)).toBeNull();
    expectCode(await tryAll(path, false), CORRUPT);
  });

  it('internal snapshots: read-only and read-write (writes copy shared clusters)', async () => {
    const path = await image();
    await must('qemu-img', ['snapshot', '-c', 'snap1', path]);
    expect(await tryAll(path, true)).toBeNull();
    expect(await tryAll(path, false)).toBeNull();
  });
});

describe('qcow2 corrupt metadata', () => {
  it('a truncated L1 table', async () => {
    const path = await image();
    const h = await headerOf(path);
    await poke(path, 36, be32(100_000)); // L1 claims more entries than the file holds
    await truncate(path, h.l1TableOffset + 4096);
    expectCode(await tryAll(path, true), CORRUPT);
  });

  it('a truncated refcount table', async () => {
    const path = await image();
    const size = (await stat(path)).size;
    await poke(path, 48, be64(Math.ceil(size / 65536) * 65536));
    expectCode(await tryAll(path, true), CORRUPT);
  });

  it('an L2 table offset past the end of the file', async () => {
    const path = await image();
    const h = await headerOf(path);
    await poke(path, h.l1TableOffset, be64(2 ** 40 + 2 ** 63 * 0));
    expectCode(await tryAll(path, true), CORRUPT);
    const f = await ImageFile.open(path, { readOnly: true });
    const c = await checkQcow2(f);
    await f.close();
    expect(c.corruptions).toBeGreaterThan(0);
    expect(c.messages.join('\n')).toMatch(/past the end/);
    expect((await run('qemu-img', ['check', path])).code).not.toBe(0);
  });

  it('an L2 table offset that is not cluster aligned', async () => {
    const path = await image();
    const h = await headerOf(path);
    const l1 = await peek(path, h.l1TableOffset, 8);
    l1[6] = (l1[6]! | 0x02) & 0xff; // + 512 bytes
    await poke(path, h.l1TableOffset, l1);
    expectCode(await tryAll(path, true), CORRUPT);
  });

  it('a cycle: the L1 entry points at the L1 table itself', async () => {
    const path = await image();
    const h = await headerOf(path);
    await poke(path, h.l1TableOffset, be64(h.l1TableOffset));
    expectCode(await tryAll(path, true), CORRUPT);
    const f = await ImageFile.open(path, { readOnly: true });
    expect((await checkQcow2(f)).corruptions).toBeGreaterThan(0);
    await f.close();
  });

  it('a cycle: an L2 entry points at its own L2 table; writing is refused and the image marked corrupt', async () => {
    const path = await image();
    const h = await headerOf(path);
    const l1 = await peek(path, h.l1TableOffset, 8);
    const l2off = Number(new DataView(l1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    // Guest cluster 1 -> the L2 table's own cluster, flagged COPIED.
    await poke(path, l2off + 8, be64(l2off + 2 ** 63));
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    const err = await img.write(new Uint8Array(512).fill(7), 65536 + 100).catch((e) => e);
    expectCode(err, CORRUPT);
    expect(img.corrupt).toBe(true);
    expectCode(
      await img.write(new Uint8Array(1), 0).catch((e) => e),
      'ERR_VMDISK_BLOCK_QCOW2_READ_ONLY',
    );
    await img.close();
    await f.close();
    expect(((await headerOf(path)).incompatibleFeatures & 2n) !== 0n).toBe(true);
    expectCode(await tryAll(path, false), CORRUPT);
  });

  it('a refcount of zero for an L2 table: allocation notices the overlap', async () => {
    const path = await image();
    const h = await headerOf(path);
    const rt = await peek(path, h.refcountTableOffset, 8);
    const block = Number(new DataView(rt.buffer).getBigUint64(0));
    const l1 = await peek(path, h.l1TableOffset, 8);
    const l2off = Number(new DataView(l1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    await poke(path, block + 2 * (l2off / 65536), [0, 0]);
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    const err = await img.write(new Uint8Array(65536).fill(3), 1 << 20).catch((e) => e);
    expectCode(err, CORRUPT);
    await img.close();
    await f.close();
  });

  it('refcount overflow: a dirty image whose rebuild needs more than refcount_bits', async () => {
    const path = await image('refcount_bits=1,lazy_refcounts=on');
    const h = await headerOf(path);
    const l1 = await peek(path, h.l1TableOffset, 8);
    const l2off = Number(new DataView(l1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    const e0 = await peek(path, l2off, 8);
    await poke(path, l2off + 8, e0); // guest cluster 1 shares guest cluster 0's host cluster
    await poke(path, 72, be64(1)); // dirty
    expectCode(await tryAll(path, false), 'ERR_VMDISK_BLOCK_QCOW2_REFCOUNT_OVERFLOW');
    const f = await ImageFile.open(path, { readOnly: true });
    const c = await checkQcow2(f);
    await f.close();
    expect(c.messages.join('\n')).toMatch(/more than refcount_bits/);
  });

  it('a refcount entry of 2^63 (refcount_bits=64) is reported, not mis-read', async () => {
    const path = await image('refcount_bits=64');
    const h = await headerOf(path);
    const rt = await peek(path, h.refcountTableOffset, 8);
    const block = Number(new DataView(rt.buffer).getBigUint64(0));
    await poke(path, block + 8 * 5, be64(2 ** 63));
    const f = await ImageFile.open(path, { readOnly: true });
    const c = await checkQcow2(f);
    await f.close();
    expect(c.corruptions).toBeGreaterThan(0);
    expect(await tryAll(path, true)).toBeNull();
  });

  it('a compressed cluster with garbage data', async () => {
    const raw = join(dir, 'cz.raw');
    await must('qemu-img', ['create', '-f', 'raw', raw, '1M']);
    await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 1M', raw]);
    const path = join(dir, 'cz.qcow2');
    await must('qemu-img', ['convert', '-c', '-O', 'qcow2', raw, path]);
    const h = await headerOf(path);
    const l1 = await peek(path, h.l1TableOffset, 8);
    const l2off = Number(new DataView(l1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    const e = await peek(path, l2off, 8);
    const hostOff = Number(new DataView(e.buffer).getBigUint64(0) & ((1n << 54n) - 1n));
    await poke(path, hostOff, new Uint8Array(64).fill(0xff));
    expectCode(await tryAll(path, true), 'ERR_VMDISK_BLOCK_QCOW2_COMPRESSION');
  });
  // Backing chains that loop are refused by the graph: backing-loop.test.ts.
});

describe('qcow2 fuzzed metadata', () => {
  it('random byte flips in header, L1, L2 and refcount structures: a clear error or a working image, never a crash or hang', async () => {
    const base = await image('cluster_size=4096,lazy_refcounts=on', [
      'write -P 1 0 300k',
      'write -z 1M 64k',
      'write -P 2 2M 100k',
    ]);
    const h = await headerOf(base);
    const size = (await stat(base)).size;
    const pristine = await peek(base, 0, size);
    const r = rng(Number(process.env.QCOW2_FUZZ_SEED ?? 12345));
    const path = join(dir, 'fuzz.qcow2');
    let errors = 0;
    for (let i = 0; i < 80; i++) {
      const buf = pristine.slice();
      const regions = [
        [0, 112],
        [h.l1TableOffset, 64],
        [h.refcountTableOffset, 64],
        [0, Math.min(size, 64 * 4096)],
      ] as const;
      for (let k = 0; k < 1 + Math.floor(r() * 4); k++) {
        const [start, len] = regions[Math.floor(r() * regions.length)]!;
        const at = start + Math.floor(r() * len);
        buf[at] = buf[at]! ^ (1 << Math.floor(r() * 8));
      }
      const fh = await open(path, 'w');
      await fh.write(buf, 0, buf.length, 0);
      await fh.close();
      for (const ro of [true, false]) {
        const timeout = new Promise((resolve) => setTimeout(() => resolve('hang'), 10_000).unref());
        const err = await Promise.race([tryAll(path, ro), timeout]);
        expect(err).not.toBe('hang');
        if (err !== null) {
          errors++;
          expect(err, String(err)).toBeInstanceOf(BlockError);
          expect((err as BlockError).code).toMatch(/^ERR_VMDISK_BLOCK_QCOW2_/);
        }
      }
      const f = await ImageFile.open(path, { readOnly: true });
      const c = await checkQcow2(f).catch((e: unknown) => e);
      await f.close();
      if (c instanceof Error) expect(c, c.stack).toBeInstanceOf(BlockError);
    }
    expect(errors).toBeGreaterThan(0);
  });
});

describe('qcow2 check agrees with qemu-img check', () => {
  async function both(path: string) {
    const q = await run('qemu-img', ['check', '--output=json', path]);
    const qj = JSON.parse(q.stdout) as { leaks?: number; corruptions?: number };
    const f = await ImageFile.open(path, { readOnly: true });
    const ours = await checkQcow2(f);
    await f.close();
    return { qemu: { leaks: qj.leaks ?? 0, corruptions: qj.corruptions ?? 0, code: q.code }, ours };
  }

  it('a clean image, a leaked cluster, a refcount too low, an unaligned data offset', async () => {
    const clean = await image();
    let r = await both(clean);
    expect(r.qemu).toMatchObject({ leaks: 0, corruptions: 0, code: 0 });
    expect(r.ours.leaks + r.ours.corruptions).toBe(0);

    // A leak: one more cluster at the end of the file, counted but referenced by nothing.
    const leak = await image();
    const h = await headerOf(leak);
    const size = (await stat(leak)).size;
    await truncate(leak, size + 65536);
    const rt = await peek(leak, h.refcountTableOffset, 8);
    const block = Number(new DataView(rt.buffer).getBigUint64(0));
    await poke(leak, block + 2 * (size / 65536), [0, 1]);
    r = await both(leak);
    expect(r.qemu).toMatchObject({ leaks: 1, corruptions: 0, code: 3 });
    expect(r.ours.leaks).toBe(1);
    expect(r.ours.corruptions).toBe(0);

    // A refcount too low: a data cluster counted zero times.
    const low = await image();
    const h2 = await headerOf(low);
    const l1 = await peek(low, h2.l1TableOffset, 8);
    const l2off = Number(new DataView(l1.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    const e = await peek(low, l2off, 8);
    const host = Number(new DataView(e.buffer).getBigUint64(0) & ((1n << 56n) - 512n));
    const rt2 = await peek(low, h2.refcountTableOffset, 8);
    const block2 = Number(new DataView(rt2.buffer).getBigUint64(0));
    await poke(low, block2 + 2 * (host / 65536), [0, 0]);
    r = await both(low);
    expect(r.qemu.corruptions).toBeGreaterThan(0);
    expect(r.qemu.code).toBe(2);
    expect(r.ours.corruptions).toBeGreaterThan(0);
    expect(r.ours.messages.join('\n')).toContain(`cluster ${host / 65536} refcount=0 reference=1`);
  });
});
