// Growth of the image file ahead of allocation (grow.ts): an allocation past the end of the
// file first extends it sparsely well beyond, so that data writes land inside the file;
// close cuts it back to the last cluster in use. `qemu-img check` finds the image clean and
// `qemu-img compare` finds the data, while open, after close, and when truncate fails.

import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import type { Qcow2File } from '../src/drivers/qcow2/types.ts';
import { ImageFile, pattern } from './qcow2-helpers.ts';
import { must, qemuImgCreate, run, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** `qemu-img check` (-U: the image may be open) must be clean; returns its image end offset. */
async function checkClean(path: string): Promise<number> {
  const r = await run('qemu-img', ['check', '-U', '--output=json', path]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const j = JSON.parse(r.stdout) as { 'image-end-offset': number; leaks?: number };
  expect(j.leaks ?? 0).toBe(0);
  return j['image-end-offset'];
}

/** Writes 3 MiB at 5 MiB and 1 MiB at 40 MiB; returns the expected raw content. */
async function writeSome(write: (buf: Uint8Array, off: number) => Promise<void>) {
  const model = new Uint8Array(SIZE);
  const a = pattern(new Uint8Array(3 * MiB), 1);
  const b = pattern(new Uint8Array(MiB), 2);
  await Promise.all([write(a, 5 * MiB), write(b, 40 * MiB)]);
  model.set(a, 5 * MiB);
  model.set(b, 40 * MiB);
  return model;
}

async function compareWith(path: string, model: Uint8Array, name: string): Promise<void> {
  const raw = join(dir, `${name}.raw`);
  await writeFile(raw, model);
  await must('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', raw, path]);
}

describe('qcow2 file growth ahead of allocation', () => {
  it('extends the file past an allocation, and close cuts it back to the data', async () => {
    const path = join(dir, 'grow.qcow2');
    await qemuImgCreate(path, SIZE);
    const before = (await stat(path)).size;
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    const model = await writeSome((buf, off) => img.write(buf, off));
    await img.flush();
    // While open: the file reaches well past the clusters in use (sparsely).
    const open = (await stat(path)).size;
    expect(open).toBeGreaterThanOrEqual(before + 128 * MiB);
    const end = await checkClean(path);
    expect(end).toBeLessThan(open);
    await compareWith(path, model, 'grow-open');
    await img.close();
    await f.close();
    // After close: cut back to the last cluster in use, as qemu-img reports it.
    expect((await stat(path)).size).toBe(await checkClean(path));
    await compareWith(path, model, 'grow');
  });

  it('a file grown by an earlier session keeps its size at open', async () => {
    const path = join(dir, 'kept.qcow2');
    await qemuImgCreate(path, SIZE);
    await must('truncate', ['-s', String(300 * MiB), path]);
    const f = await ImageFile.open(path);
    const img = await openQcow2(f, { backing: null });
    const model = await writeSome((buf, off) => img.write(buf, off));
    await img.close();
    await f.close();
    expect((await stat(path)).size).toBe(300 * MiB);
    await checkClean(path);
    await compareWith(path, model, 'kept');
  });

  it('writes still extend a file that refuses truncate', async () => {
    const path = join(dir, 'fixed.qcow2');
    await qemuImgCreate(path, SIZE);
    const f = await ImageFile.open(path);
    let refused = 0;
    const noTruncate: Qcow2File = {
      read: (b, o) => f.read(b, o),
      write: (b, o) => f.write(b, o),
      size: () => f.size(),
      flush: () => f.flush(),
      truncate: async () => {
        refused++;
        throw new Error('truncate refused');
      },
    };
    const img = await openQcow2(noTruncate, { backing: null });
    const model = await writeSome((buf, off) => img.write(buf, off));
    await img.close();
    await f.close();
    expect(refused).toBe(1); // tried once, then left to the writes
    expect((await stat(path)).size).toBe(await checkClean(path));
    await compareWith(path, model, 'fixed');
  });
});
