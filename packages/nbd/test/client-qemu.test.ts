// Our client against qemu-nbd: raw and qcow2 images, block status compared with what
// `qemu-img map --output=json` says of the same image, qemu:allocation-depth over a
// backing chain, many requests in flight, and the image checked by qemu-img afterwards.

import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { qemuImgMap } from '../../../tools/test-support/src/index.ts';
import type { NbdClient as Client, NbdExtent } from '../src/index.ts';
import { pattern, run, usePeers } from './client-peers.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Runs of equal state: [start, length, state] with neighbours of equal state merged. */
function runs<T>(items: { length: number; state: T }[]): [number, number, T][] {
  const out: [number, number, T][] = [];
  let at = 0;
  for (const { length, state } of items) {
    const last = out[out.length - 1];
    if (last && JSON.stringify(last[2]) === JSON.stringify(state)) last[1] += length;
    else out.push([at, length, state]);
    at += length;
  }
  return out;
}

/** The whole export's extents of one context, asking again where the server stopped short. */
async function fullMap(c: Client, context: string): Promise<NbdExtent[]> {
  const all: NbdExtent[] = [];
  let at = 0;
  while (at < c.size) {
    const got = (await c.blockStatus(at, c.size - at)).get(context)!;
    for (const e of got) {
      const length = Math.min(e.length, c.size - at);
      all.push({ ...e, length });
      at += length;
      if (at >= c.size) break;
    }
  }
  return all;
}

describe('NbdClient against qemu-nbd', () => {
  const t = usePeers();
  const serve = t.qemuNbd;
  const { connect } = t;

  it('reads and writes a raw image over TCP; block status matches qemu-img map', async () => {
    const file = join(t.dir, 'disk.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', file, '4M']);
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x11 0 64k',
      '-c',
      'write -P 0x22 1M 192k',
      file,
    ]);
    const p = await serve(['-f', 'raw', '-x', 'disk0', '-D', 'a raw disk', file], { tcp: true });
    const c = await connect(`nbd://127.0.0.1:${p.port!}/disk0`);
    expect(c.size).toBe(4 * MiB);
    expect(c.exportName).toBe('disk0');
    expect(c.description).toBe('a raw disk');
    expect(c.structuredReplies).toBe(true);
    expect(c.canFlush && c.canTrim && c.canWriteZeroes).toBe(true);

    const first = await c.read(0, 128 * KiB);
    expect(first.subarray(0, 64 * KiB).every((b) => b === 0x11)).toBe(true);
    expect(first.subarray(64 * KiB).every((b) => b === 0)).toBe(true);

    const data = pattern(256 * KiB, 31);
    await c.write(2 * MiB, data, { fua: c.canFua });
    await c.writeZeroes(1 * MiB + 64 * KiB, 64 * KiB);
    await c.flush();

    const ours = runs(
      (await fullMap(c, 'base:allocation')).map((e) => ({
        length: e.length,
        state: { data: !e.hole, zero: e.zero },
      })),
    );
    const theirs = runs(
      (await qemuImgMap(file, 'raw')).map((m) => ({
        length: m.length,
        state: { data: m.data, zero: m.zero },
      })),
    );
    expect(ours).toEqual(theirs);
    // Data, hole, data (and the zeroed range), hole, data, hole: the map is not trivial.
    expect(ours.length).toBeGreaterThanOrEqual(5);
    await c.close();

    const disk = await readFile(file);
    expect(disk.subarray(2 * MiB, 2 * MiB + data.length).equals(data)).toBe(true);
    expect(disk.subarray(1 * MiB, 1 * MiB + 64 * KiB).every((b) => b === 0x22)).toBe(true);
    expect(disk.subarray(1 * MiB + 64 * KiB, 1 * MiB + 128 * KiB).every((b) => b === 0)).toBe(true);
  });

  it('reports qemu:allocation-depth over a qcow2 backing chain, as qemu-img map does', async () => {
    const base = join(t.dir, 'base.qcow2');
    const top = join(t.dir, 'top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 1M', base]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 512k 1M', top]);
    const p = await serve(['-f', 'qcow2', '-A', top]);
    const c = await connect({ path: p.socket! }, { allocationDepth: true });
    expect(c.metaContexts).toContain('base:allocation');
    expect(c.metaContexts).toContain('qemu:allocation-depth');

    const both = await c.blockStatus(0, c.size);
    expect(both.get('qemu:allocation-depth')!.length).toBeGreaterThan(0);
    const ours = runs(
      (await fullMap(c, 'qemu:allocation-depth')).map((e) => ({
        length: e.length,
        state: e.depth,
      })),
    );
    const theirs = runs(
      (await qemuImgMap(top, 'qcow2')).map((m) => ({
        length: m.length,
        state: m.present ? m.depth + 1 : 0,
      })),
    );
    expect(ours).toEqual(theirs);
    expect(ours.map((r) => r[2])).toEqual([2, 1, 0]);

    const bytes = await c.read(0, 2 * MiB);
    expect(bytes.subarray(0, 512 * KiB).every((b) => b === 0x33)).toBe(true);
    expect(bytes.subarray(512 * KiB, 1536 * KiB).every((b) => b === 0x44)).toBe(true);
    expect(bytes.subarray(1536 * KiB).every((b) => b === 0)).toBe(true);
    await c.close();
  });

  it('keeps 256 requests in flight on a qcow2 image, which qemu-img then finds consistent', async () => {
    const file = join(t.dir, 'many.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, '8M']);
    const p = await serve(['-f', 'qcow2', '--discard=unmap', file]);
    const c = await connect(`nbd+unix:///?socket=${encodeURIComponent(p.socket!)}`);
    const block = 16 * KiB;
    const count = 256;
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < count; i++)
      ops.push(c.write(((i * 97) % count) * block, pattern(block, i)));
    await Promise.all(ops);
    await c.flush();
    const reads = await Promise.all(
      Array.from({ length: count }, (_, i) => c.read(((i * 97) % count) * block, block)),
    );
    reads.forEach((b, i) => {
      expect(Buffer.from(b).equals(pattern(block, i))).toBe(true);
    });
    await c.trim(0, 1 * MiB);
    expect((await c.read(0, 1 * MiB)).every((b) => b === 0)).toBe(true);
    await c.close();
    await p.stop();
    await run('qemu-img', ['check', '-q', file]);
    // The image, converted by qemu-img, holds what we wrote.
    const raw = join(t.dir, 'many.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, raw]);
    const disk = await readFile(raw);
    expect(disk.subarray(0, 1 * MiB).every((b) => b === 0)).toBe(true);
    for (let i = 0; i < count; i++) {
      const at = ((i * 97) % count) * block;
      if (at < 1 * MiB) continue;
      expect(disk.subarray(at, at + block).equals(pattern(block, i))).toBe(true);
    }
  });
});
