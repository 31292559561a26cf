import { JobRegistry } from '@vmdisk/ao';
import { beforeEach, describe, expect, it } from 'vitest';
import { copyBeforeWriteOf } from '../src/drivers/copy-before-write.ts';
import { type BlockBackend, blockdevBackup } from '../src/index.ts';
import type { BlockNode } from '../src/node.ts';
import { graphPerTest, sh } from './helpers.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;

const t = graphPerTest('vmdisk-backup-');
let jobs: JobRegistry;
beforeEach(() => {
  jobs = new JobRegistry({ events: { push: () => {} } });
});

const { p } = t;

function fill(len: number, byte: number): Uint8Array {
  return new Uint8Array(len).fill(byte);
}

/** src.raw: 0x11 over [0, 1M), 0x22 over [2M, 3M), zeros elsewhere; opened as node 'src'. */
async function source(): Promise<BlockNode> {
  sh('qemu-img', ['create', '-q', '-f', 'raw', p('src.raw'), String(SIZE)]);
  sh('qemu-io', [
    '-f',
    'raw',
    '-c',
    'write -P 0x11 0 1M',
    '-c',
    'write -P 0x22 2M 1M',
    p('src.raw'),
  ]);
  return (await t.graph.add({
    driver: 'raw',
    'node-name': 'src',
    file: { driver: 'file', filename: p('src.raw') },
  })) as BlockNode;
}

async function qcow2(name: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return (await t.graph.add({
    driver: 'qcow2',
    'node-name': name,
    file: { driver: 'file', filename: p(`${name}.qcow2`) },
    ...extra,
  })) as BlockNode;
}

/** What the guest writes after the point-in-time: unaligned, zeros and a discard too. */
async function guestWrites(guest: BlockBackend): Promise<void> {
  await guest.write(512, fill(4 * KiB, 0xaa));
  await guest.write(2 * MiB - 512, fill(1024, 0xbb));
  await guest.writeZeroes(2 * MiB + 64 * KiB, 128 * KiB);
  await guest.write(3 * MiB + 100, fill(200, 0xcc));
}

/** The source's bytes before guestWrites (the point-in-time). */
function original(): Uint8Array {
  const b = new Uint8Array(SIZE);
  b.fill(0x11, 0, MiB);
  b.fill(0x22, 2 * MiB, 3 * MiB);
  return b;
}

/** Copy-before-write 'cbw' over node 'src', copying to `target`: the guest's backend on it. */
async function cbwFilter(
  target: string,
  options: Record<string, unknown> = {},
): Promise<BlockBackend> {
  await t.graph.add({
    driver: 'copy-before-write',
    'node-name': 'cbw',
    file: 'src',
    target,
    ...options,
  });
  return t.graph.createBackend('cbw', { write: true });
}

/** The fleecing set-up: cbwFilter and snapshot-access 'snap' over it, with their backends. */
async function fleece(
  target: string,
  options: Record<string, unknown> = {},
): Promise<{ guest: BlockBackend; snap: BlockBackend }> {
  const guest = await cbwFilter(target, options);
  await t.graph.add({
    driver: 'snapshot-access',
    'node-name': 'snap',
    file: 'cbw',
    'read-only': true,
  });
  return { guest, snap: await t.graph.createBackend('snap', { shareWrite: true }) };
}

/** Node 'bad': a qcow2 image whose every write fails (blkdebug). */
async function failingTarget(): Promise<void> {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('tmp.qcow2'), String(SIZE)]);
  await t.graph.add({
    driver: 'blkdebug',
    'node-name': 'bad',
    'inject-error': [{ iotype: 'write' }],
    image: { driver: 'qcow2', file: { driver: 'file', filename: p('tmp.qcow2') } },
  });
}

describe('copy-before-write and snapshot-access (image fleecing)', () => {
  it('reads the point-in-time while the guest writes through the filter', async () => {
    await source();
    sh('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      p('src.raw'),
      '-F',
      'raw',
      p('tmp.qcow2'),
    ]);
    await qcow2('tmp', { backing: 'src' });
    const { guest, snap } = await fleece('tmp');
    await guestWrites(guest);

    const now = new Uint8Array(SIZE);
    await snap.read(0, now);
    expect(Buffer.from(now).equals(Buffer.from(original()))).toBe(true);
    // The guest sees its writes; the clusters it touched were copied, once.
    const head = new Uint8Array(8 * KiB);
    await guest.read(0, head);
    expect(head[511]).toBe(0x11);
    expect(head[512]).toBe(0xaa);
    const cbw = copyBeforeWriteOf(t.graph.node('cbw'))!;
    expect(cbw.doneBitmap.count()).toBe(6 * 64 * KiB);
    await guest.close();
    await snap.close();
  });

  it('a snapshot read from the source holds back a guest write to its range', async () => {
    await source();
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('tmp.qcow2'), String(SIZE)]);
    await qcow2('tmp');
    const { guest, snap } = await fleece('tmp');
    // Reads and writes of the same clusters, interleaved: every read sees the old data.
    const reads: Promise<void>[] = [];
    const bufs: Uint8Array[] = [];
    for (let i = 0; i < 16; i++) {
      const b = new Uint8Array(64 * KiB);
      bufs.push(b);
      reads.push(snap.read(i * 64 * KiB, b));
      reads.push(guest.write(i * 64 * KiB, fill(64 * KiB, 0xee)));
    }
    await Promise.all(reads);
    for (const b of bufs) expect(b.every((x) => x === 0x11)).toBe(true);
    await guest.close();
    await snap.close();
  });

  it('break-snapshot: a failed copy lets the guest write and the snapshot fails', async () => {
    await source();
    await failingTarget();
    const { guest, snap } = await fleece('bad', { 'on-cbw-error': 'break-snapshot' });
    await guest.write(0, fill(4 * KiB, 0xaa));
    await expect(snap.read(MiB, new Uint8Array(512))).rejects.toMatchObject({
      errnoName: 'EACCES',
    });
    await guest.close();
    await snap.close();
  });

  it('break-guest-write (the default): the guest write fails and nothing is written', async () => {
    await source();
    await failingTarget();
    const guest = await cbwFilter('bad');
    await expect(guest.write(0, fill(4 * KiB, 0xaa))).rejects.toMatchObject({ errnoName: 'EIO' });
    const b = new Uint8Array(4 * KiB);
    await guest.read(0, b);
    expect(b.every((x) => x === 0x11)).toBe(true);
    await guest.close();
  });
});

describe('backup job', () => {
  it('sync=full: the target has the disk as of the start, though the guest writes meanwhile', async () => {
    await source();
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('dst.qcow2'), String(SIZE)]);
    await qcow2('dst');
    const guest = await t.graph.createBackend('src', { write: true });
    // Slow enough that the guest's writes come before the job's copy reaches them.
    const bj = await blockdevBackup(t.graph, jobs, {
      jobId: 'b',
      device: 'src',
      target: 'dst',
      sync: 'full',
      speed: 2 * MiB,
    });
    await guestWrites(guest);
    await bj.job.wait();
    expect(bj.job.error).toBeUndefined();
    // The filter is gone: the guest's backend is on the source again.
    expect(t.graph.query().some((n) => n.driver === 'copy-before-write')).toBe(false);
    await guest.close();
    await t.graph.close();
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', p('src.raw'), p('now.raw')]);
    sh('qemu-img', ['check', '-q', p('dst.qcow2')]);
    sh('qemu-img', ['create', '-q', '-f', 'raw', p('then.raw'), String(SIZE)]);
    sh('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x11 0 1M',
      '-c',
      'write -P 0x22 2M 1M',
      p('then.raw'),
    ]);
    sh('qemu-img', ['compare', '-q', p('then.raw'), p('dst.qcow2')]);
    expect(() => sh('qemu-img', ['compare', '-q', p('now.raw'), p('dst.qcow2')])).toThrow();
  });

  it('sync=incremental copies the bitmap clusters and resets the bitmap; a failure keeps it', async () => {
    const src = await source();
    const bm = src.createDirtyBitmap(64 * KiB, 'b0');
    const guest = await t.graph.createBackend('src', { write: true });
    await guest.write(0, fill(4 * KiB, 0x33));
    await guest.write(3 * MiB, fill(128 * KiB, 0x44));
    expect(bm.count()).toBe(3 * 64 * KiB);

    // A failing target: the bitmap keeps its bits (and what was written meanwhile).
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('bad.qcow2'), String(SIZE)]);
    await t.graph.add({
      driver: 'blkdebug',
      'node-name': 'bad',
      'inject-error': [{ iotype: 'write' }],
      image: { driver: 'qcow2', file: { driver: 'file', filename: p('bad.qcow2') } },
    });
    const failed = await blockdevBackup(t.graph, jobs, {
      jobId: 'f',
      device: 'src',
      target: 'bad',
      sync: 'incremental',
      bitmap: 'b0',
    });
    await failed.job.wait().catch(() => {});
    expect(failed.job.error).toBeDefined();
    expect(bm.count()).toBe(3 * 64 * KiB);
    expect(bm.busy).toBe(false);
    expect(bm.enabled).toBe(true);

    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('inc.qcow2'), String(SIZE)]);
    await qcow2('inc');
    const bj = await blockdevBackup(t.graph, jobs, {
      jobId: 'i',
      device: 'src',
      target: 'inc',
      sync: 'incremental',
      bitmap: 'b0',
      speed: 128 * KiB,
    });
    expect(bm.busy).toBe(true);
    // Written during the job: dirty in the bitmap afterwards, and not in this backup.
    await guest.write(2 * MiB, fill(512, 0x55));
    await bj.job.wait();
    expect(bj.job.error).toBeUndefined();
    expect([...bm.dirtyRanges()]).toEqual([{ offset: 2 * MiB, length: 64 * KiB }]);
    await guest.close();
    await t.graph.close();
    const map = JSON.parse(sh('qemu-img', ['map', '--output=json', p('inc.qcow2')])) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    expect(map.filter((m) => m.data).map((m) => [m.start, m.length])).toEqual([
      [0, 64 * KiB],
      [3 * MiB, 128 * KiB],
    ]);
  });

  it('sync=incremental over scattered clusters of data and zeros: the point-in-time, though the guest writes into both', async () => {
    // A qcow2 source: data over [0, 1M), unallocated after. Its block status is read once
    // per extent and kept for the clusters after; the guest's writes meanwhile must not
    // leak into the backup.
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('srcq.qcow2'), String(SIZE)]);
    sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', p('srcq.qcow2')]);
    const src = await qcow2('srcq');
    const bm = src.createDirtyBitmap(64 * KiB, 'b0');
    const guest = await t.graph.createBackend('srcq', { write: true });
    // Dirty: every other cluster of [0, 1M) and of [2M, 3M), left as they were.
    for (let at = 0; at < MiB; at += 128 * KiB) {
      await guest.write(at, fill(64 * KiB, 0x11));
      await guest.writeZeroes(2 * MiB + at, 64 * KiB);
    }
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('inc.qcow2'), String(SIZE)]);
    await qcow2('inc');
    const bj = await blockdevBackup(t.graph, jobs, {
      jobId: 'i',
      device: 'srcq',
      target: 'inc',
      sync: 'incremental',
      bitmap: 'b0',
      speed: 256 * KiB,
    });
    // Into dirty clusters still to copy, of data and of the unallocated part.
    await guest.write(3 * 128 * KiB + 100, fill(300, 0x66));
    await guest.write(2 * MiB + 5 * 128 * KiB, fill(64 * KiB, 0x77));
    await bj.job.wait();
    expect(bj.job.error).toBeUndefined();
    // The bitmap now holds what the guest wrote during the job.
    expect([...bm.dirtyRanges()]).toEqual([
      { offset: 384 * KiB, length: 64 * KiB },
      { offset: 2 * MiB + 640 * KiB, length: 64 * KiB },
    ]);
    await guest.close();
    await t.graph.close();
    // The dirty clusters as they were at the start, zeros elsewhere (the rest unallocated).
    sh('qemu-img', ['create', '-q', '-f', 'raw', p('then.raw'), String(SIZE)]);
    const cmds: string[] = [];
    for (let at = 0; at < MiB; at += 128 * KiB) cmds.push('-c', `write -P 0x11 ${at} 64k`);
    sh('qemu-io', ['-f', 'raw', ...cmds, p('then.raw')]);
    sh('qemu-img', ['compare', '-q', p('then.raw'), p('inc.qcow2')]);
    const map = JSON.parse(sh('qemu-img', ['map', '--output=json', p('inc.qcow2')])) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    // Only the dirty clusters of data were written as data.
    expect(map.filter((m) => m.data).map((m) => [m.start, m.length])).toEqual(
      Array.from({ length: 8 }, (_, i) => [i * 128 * KiB, 64 * KiB]),
    );
  });

  it('sync=incremental over more scattered clusters than copies in flight: all copied; a failure among them ends the job once its copies are done', async () => {
    const src = await source();
    const bm = src.createDirtyBitmap(64 * KiB, 'b0');
    const guest = await t.graph.createBackend('src', { write: true });
    // Every other cluster of the disk: 32 areas, twice the copies in flight.
    const dirty = () => Array.from({ length: SIZE / (128 * KiB) }, (_, i) => i * 128 * KiB);
    for (const at of dirty()) await guest.write(at, fill(64 * KiB, 0x5a));
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('inc.qcow2'), String(SIZE)]);
    await qcow2('inc');
    const ok = await blockdevBackup(t.graph, jobs, {
      jobId: 'i',
      device: 'src',
      target: 'inc',
      sync: 'incremental',
      bitmap: 'b0',
    });
    await ok.job.wait();
    expect(ok.job.error).toBeUndefined();
    expect(bm.count()).toBe(0);

    // Dirty again; a write into the last area fails (after the loop has handed out every
    // area, so the job must wait for its copies): always keeps what was not copied.
    for (const at of dirty()) await guest.write(at, fill(64 * KiB, 0x5b));
    sh('qemu-img', ['create', '-q', '-f', 'raw', p('bad.raw'), String(SIZE)]);
    await t.graph.add({
      driver: 'blkdebug',
      'node-name': 'bad',
      'inject-error': [{ iotype: 'write', offset: SIZE - 128 * KiB, length: 64 * KiB }],
      image: { driver: 'raw', file: { driver: 'file', filename: p('bad.raw') } },
    });
    const failed = await blockdevBackup(t.graph, jobs, {
      jobId: 'f',
      device: 'src',
      target: 'bad',
      sync: 'bitmap',
      bitmap: 'b0',
      bitmapMode: 'always',
    });
    await failed.job.wait().catch(() => {});
    expect(failed.job.error).toBeDefined();
    const left = [...bm.dirtyRanges()];
    expect(left).toContainEqual({ offset: SIZE - 128 * KiB, length: 64 * KiB });
    // What was left is dirty clusters only; what was copied reads as the guest wrote it.
    expect(left.every((r) => r.offset % (128 * KiB) === 0 && r.length === 64 * KiB)).toBe(true);
    const back = new Uint8Array(64 * KiB);
    for (const at of dirty()) {
      if (left.some((r) => r.offset === at)) continue;
      await t.graph.node('bad').read(at, back);
      expect(back.every((b) => b === 0x5b)).toBe(true);
    }
    await guest.close();
    await t.graph.close();
    // The first backup: the dirty clusters as they were, zeros elsewhere.
    sh('qemu-img', ['create', '-q', '-f', 'raw', p('then.raw'), String(SIZE)]);
    const cmds = dirty().flatMap((at) => ['-c', `write -P 0x5a ${at} 64k`]);
    sh('qemu-io', ['-f', 'raw', ...cmds, p('then.raw')]);
    sh('qemu-img', ['compare', '-q', p('then.raw'), p('inc.qcow2')]);
  });

  it('bitmap-mode never keeps the bitmap; always, failed, keeps only what was not copied', async () => {
    const src = await source();
    const bm = src.createDirtyBitmap(64 * KiB, 'b0');
    const guest = await t.graph.createBackend('src', { write: true });
    await guest.write(0, fill(4 * KiB, 0x33));
    await guest.write(3 * MiB, fill(128 * KiB, 0x44));
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', p('a.qcow2'), String(SIZE)]);
    await qcow2('a');
    const never = await blockdevBackup(t.graph, jobs, {
      jobId: 'n',
      device: 'src',
      target: 'a',
      sync: 'bitmap',
      bitmap: 'b0',
      bitmapMode: 'never',
    });
    await never.job.wait();
    expect(never.job.error).toBeUndefined();
    expect(bm.count()).toBe(3 * 64 * KiB);

    // Writes at 3M fail, those at 0 succeed: always leaves the bitmap with what was not
    // copied (and what was written meanwhile: nothing), cluster 0 clean.
    sh('qemu-img', ['create', '-q', '-f', 'raw', p('bad.raw'), String(SIZE)]);
    await t.graph.add({
      driver: 'blkdebug',
      'node-name': 'bad',
      'inject-error': [{ iotype: 'write', offset: 3 * MiB, length: 128 * KiB }],
      image: { driver: 'raw', file: { driver: 'file', filename: p('bad.raw') } },
    });
    const always = await blockdevBackup(t.graph, jobs, {
      jobId: 'a',
      device: 'src',
      target: 'bad',
      sync: 'bitmap',
      bitmap: 'b0',
      bitmapMode: 'always',
    });
    await always.job.wait().catch(() => {});
    expect(always.job.error).toBeDefined();
    expect([...bm.dirtyRanges()]).toEqual([{ offset: 3 * MiB, length: 128 * KiB }]);
    await guest.close();
  });
});
