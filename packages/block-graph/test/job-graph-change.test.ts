import { JobRegistry } from '@vmdisk/ao';
import { describe, expect, it } from 'vitest';
import type { Qcow2Image } from '../src/drivers/qcow2/image.ts';
import { type BlockGraph, blockdevSnapshot, blockStream } from '../src/index.ts';
import type { BlockNode } from '../src/node.ts';
import { graphPerTest, sh } from './helpers.ts';

const KiB = 1024;
const CS = 64 * KiB;

const t = graphPerTest('vmdisk-job-graph-');

const { p } = t;

/** base.qcow2 (0x11 over the first 1 MiB) <- top.qcow2 (empty), 1 MiB, compat given. */
function chain(compat = '1.1'): void {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, p('base.qcow2'), '1M']);
  sh('qemu-io', ['-c', 'write -P 0x11 0 1M', p('base.qcow2')]);
  sh('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    `compat=${compat}`,
    '-b',
    'base.qcow2',
    '-F',
    'qcow2',
    p('top.qcow2'),
  ]);
}

async function openTop(extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return (await t.graph.add({
    driver: 'qcow2',
    'node-name': 'top',
    discard: 'unmap',
    file: { driver: 'file', filename: p('top.qcow2') },
    ...extra,
  })) as BlockNode;
}

async function readAll(node: string, offset: number, length: number): Promise<Buffer> {
  const b = await t.graph.createBackend(node, {});
  try {
    const buf = Buffer.alloc(length);
    await b.read(offset, buf);
    return buf;
  } finally {
    await b.close();
  }
}

describe('a guest request under a stream-like hold', () => {
  // The stream's step for one chunk: under a serialising hold of top's range, read what
  // is below and write it into top. A guest request to the range that arrives meanwhile
  // must come after it (else the copy overwrites the guest's newer zeros).
  async function underHold(
    guest: (b: Awaited<ReturnType<BlockGraph['createBackend']>>) => Promise<void>,
  ) {
    const top = await openTop();
    const guestB = await t.graph.createBackend('top', { write: true, shareWrite: true });
    const order: string[] = [];
    const hold = await top.serialise(0, CS);
    const request = guest(guestB).then(() => order.push('guest'));
    const old = top.allocBuffer(CS);
    try {
      await top.readBelow(0, old.subarray(0, CS));
      await top.write(0, old.subarray(0, CS), { owner: hold });
      order.push('copy');
    } finally {
      top.releaseBuffer(old);
      top.release(hold);
    }
    await request;
    await guestB.close();
    return order;
  }

  it('write-zeroes waits for the hold, and the zeros stay', async () => {
    chain();
    const order = await underHold((b) => b.writeZeroes(0, CS, { noHole: true }));
    expect(order).toEqual(['copy', 'guest']);
    expect((await readAll('top', 0, CS)).every((x) => x === 0)).toBe(true);
  });

  it('discard waits for the hold, and the range reads as zeros after it (as in QEMU)', async () => {
    chain();
    sh('qemu-io', ['-c', `write -P 0x22 0 ${CS}`, p('top.qcow2')]);
    const order = await underHold((b) => b.trim(0, CS));
    expect(order).toEqual(['copy', 'guest']);
    expect((await readAll('top', 0, CS)).every((x) => x === 0)).toBe(true);
  });
});

describe("qcow2's backing reader follows the graph", () => {
  it('an overlay added by blockdev-snapshot copies on write from its new backing', async () => {
    chain();
    await t.graph.add({
      driver: 'qcow2',
      'node-name': 'base',
      file: { driver: 'file', filename: p('base.qcow2') },
    });
    await openTop({ backing: null });
    await blockdevSnapshot(t.graph, 'base', 'top');
    const b = await t.graph.createBackend('top', { write: true });
    await b.write(4 * KiB, Buffer.alloc(512, 0x33));
    await b.close();
    const got = await readAll('top', 0, CS);
    const want = Buffer.alloc(CS, 0x11).fill(0x33, 4 * KiB, 4 * KiB + 512);
    expect(got.equals(want)).toBe(true);
  });

  it('after a stream drops the backing link, a compat=0.10 top zeroes without the old layer', async () => {
    chain('0.10');
    const top = await openTop();
    const image = (top.instance as unknown as { image: Qcow2Image }).image;
    expect(await image.backing?.size()).toBe(1 << 20);
    const jobs = new JobRegistry({ events: { push: () => {} } });
    const bj = await blockStream(t.graph, jobs, { jobId: 's', device: 'top' });
    await bj.job.wait();
    expect(image.backing).toBeNull();
    // qcow2 v2 cannot mark zeros over a backing file and writes them instead, copying the
    // rest of the cluster from below: there is no below any more.
    const b = await t.graph.createBackend('top', { write: true });
    await b.writeZeroes(CS + 512, 512, { noHole: true });
    await b.close();
    const want = Buffer.alloc(2 * CS, 0x11).fill(0, CS + 512, CS + 1024);
    expect((await readAll('top', 0, 2 * CS)).equals(want)).toBe(true);
    await t.graph.close();
    sh('qemu-img', ['check', p('top.qcow2')]);
    expect(
      JSON.parse(sh('qemu-img', ['info', '--output=json', p('top.qcow2')])),
    ).not.toHaveProperty('backing-filename');
  });
});
