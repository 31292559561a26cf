// withDefaults: what the server emulates for a target, and only what the target lacks.
import { describe, expect, it } from 'vitest';
import type { ExportTarget, WriteFlags } from '../src/index.ts';
import { MemoryTarget } from '../src/index.ts';
import { withDefaults } from '../src/with-defaults.ts';

const BS = { minimum: 1, preferred: 4096, maximum: 1 << 20 };

/** A bare target over memory: read, write (no native FUA) and flush, logging its calls. */
class BareTarget implements ExportTarget {
  readonly log: string[] = [];
  readonly data = Buffer.alloc(4 << 20, 0xaa);
  size(): number {
    return this.data.length;
  }
  async read(offset: number, buf: Uint8Array): Promise<void> {
    buf.set(this.data.subarray(offset, offset + buf.length));
  }
  async write(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void> {
    this.log.push(`write ${offset} ${buf.length}${flags.fua ? ' fua' : ''}`);
    this.data.set(buf, offset);
  }
  async flush(): Promise<void> {
    this.log.push('flush');
  }
}

describe('withDefaults', () => {
  it('emulates FUA with a flush after the write, and write-zeroes with writes', async () => {
    const t = new BareTarget();
    const c = withDefaults(t, BS);
    expect(c.features).toMatchObject({ trim: false, fastZero: false, cache: false });
    await c.write(0, Buffer.alloc(512, 1), { fua: true });
    await c.writeZeroes(1 << 20, 1536 << 10, { fua: true });
    expect(t.log).toEqual([
      'write 0 512',
      'flush',
      `write ${1 << 20} ${1 << 20}`,
      `write ${2 << 20} ${512 << 10}`,
      'flush',
    ]);
    expect(t.data.subarray(1 << 20, (1 << 20) + (1536 << 10)).every((b) => b === 0)).toBe(true);
    await expect(c.writeZeroes(0, 512, { fastZero: true })).rejects.toMatchObject({
      errnoName: 'ENOTSUP',
    });
  });

  it('answers block status as data and a sparse read as one data piece', async () => {
    const t = new BareTarget();
    const c = withDefaults(t, BS);
    expect(await c.blockStatus(0, 3 << 20)).toEqual([
      { length: 1 << 20, hole: false, zero: false },
    ]);
    const pieces = await c.readSparse(4096, 8192, (n) => Buffer.alloc(n));
    expect(pieces).toHaveLength(1);
    expect(pieces[0]).toMatchObject({ offset: 4096, length: 8192 });
    expect(Buffer.from(pieces[0]!.data!).every((b) => b === 0xaa)).toBe(true);
  });

  it('passes FUA down to a target that has it, and splits write-zeroes at the maximum', async () => {
    const mem = new MemoryTarget(4 << 20);
    const calls: string[] = [];
    const target: ExportTarget = {
      size: () => mem.size(),
      read: (o, b) => mem.read(o, b),
      write: (o, b, f) => mem.write(o, b, f),
      writeZeroes: async (o, n, f) => {
        calls.push(`zero ${o} ${n}${f.fua ? ' fua' : ''}`);
        await mem.writeZeroes(o, n, f);
      },
      flush: async () => {
        calls.push('flush');
      },
      nativeFua: true,
    };
    const c = withDefaults(target, BS);
    expect(c.features.fastZero).toBe(true);
    await c.writeZeroes(0, 3 << 20, { fua: true });
    expect(calls).toEqual([
      `zero 0 ${1 << 20} fua`,
      `zero ${1 << 20} ${1 << 20} fua`,
      `zero ${2 << 20} ${1 << 20} fua`,
    ]);
  });

  it('refuses a malformed sparse read of a target', async () => {
    const mem = new MemoryTarget(1 << 20);
    const target: ExportTarget = {
      size: () => mem.size(),
      read: (o, b) => mem.read(o, b),
      readSparse: async (offset, length) => [{ offset, length: length - 1 }],
    };
    await expect(
      withDefaults(target, BS).readSparse(0, 4096, (n) => Buffer.alloc(n)),
    ).rejects.toMatchObject({ errnoName: 'EIO' });
  });
});
