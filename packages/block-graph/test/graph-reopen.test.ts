// BlockGraph.reopen / reopenMultiple (QEMU's bdrv_reopen_multiple): read-only <-> read-write
// of a qcow2 node and the file below it (the fd opened again, the image locks taken again,
// as /proc/locks shows them against qemu-io's), what may not change (QEMU's words), and a
// refused reopen changing nothing.

import { describe, expect, it } from 'vitest';
import { lockedBytes, QemuIoSession } from '../../../tools/test-support/src/index.ts';
import type { BlockGraph } from '../src/index.ts';
import { pattern, qcow2Fixture, qemuImg } from './helpers.ts';

const { graph, qcow2 } = qcow2Fixture();

/** The bytes qemu-io locks on `path` with `args` (e.g. -r), as /proc/locks lists them. */
async function qemuIoBytes(path: string, args: string[]): Promise<number[]> {
  const held = await QemuIoSession.open([...args, '-f', 'qcow2', path]);
  const bytes = lockedBytes(path);
  await held.quit();
  return bytes;
}

function readOnlyOf(g: BlockGraph): Record<string, boolean> {
  return Object.fromEntries(g.query().map((n) => [n['node-name'], n['read-only']]));
}

describe('BlockGraph.reopen', () => {
  it('read-only -> read-write -> read-only: the file follows, locks and data as a fresh open', async () => {
    const path = qcow2('ro-rw.qcow2');
    const rwBytes = await qemuIoBytes(path, []);
    const roBytes = await qemuIoBytes(path, ['-r']);
    const g = graph();
    await g.add({
      driver: 'qcow2',
      'node-name': 'd',
      'read-only': true,
      file: { driver: 'file', 'node-name': 'f', filename: path },
    });
    expect(readOnlyOf(g)).toEqual({ d: true, f: true });
    expect(lockedBytes(path)).toEqual(roBytes);

    await g.reopen('d', { 'read-only': false });
    expect(readOnlyOf(g)).toEqual({ d: false, f: false });
    expect(lockedBytes(path)).toEqual(rwBytes);
    const data = pattern(7, 0, 65536);
    const b = await g.createBackend('d', { write: true });
    await b.write(65536, data);
    await b.flush();
    await b.close();

    await g.reopen('d', { 'read-only': true });
    expect(readOnlyOf(g)).toEqual({ d: true, f: true });
    expect(lockedBytes(path)).toEqual(roBytes);
    // Clean while still open: going read-only wrote the metadata back.
    qemuImg('check', '-U', path);
    const r = await g.createBackend('d');
    const got = Buffer.alloc(65536);
    await r.read(65536, got);
    expect(got.equals(data)).toBe(true);
    await r.close();
    await g.close();
    expect(lockedBytes(path)).toEqual([]);
    qemuImg('check', path);
  });

  it('a node named on its own is not reopened with its parent: QEMU refuses the parent', async () => {
    const path = qcow2('named-file.qcow2');
    const g = graph();
    await g.add({ driver: 'file', 'node-name': 'f', filename: path, 'read-only': true });
    await g.add({ driver: 'qcow2', 'node-name': 'd', 'read-only': true, file: 'f' });
    await expect(
      g.reopenMultiple([{ driver: 'qcow2', 'node-name': 'd', 'read-only': false, file: 'f' }]),
    ).rejects.toThrow('Block node is read-only');
    expect(readOnlyOf(g)).toEqual({ d: true, f: true });
    // Both in one transaction: the file first, then the format over it.
    await g.reopenMultiple([
      { driver: 'qcow2', 'node-name': 'd', file: 'f' },
      { driver: 'file', 'node-name': 'f', filename: path },
    ]);
    expect(readOnlyOf(g)).toEqual({ d: false, f: false });
  });

  it('what may not change is refused in QEMU words, and nothing changes', async () => {
    const path = qcow2('refused.qcow2');
    const other = qcow2('other.qcow2');
    const g = graph();
    await g.add({ driver: 'file', 'node-name': 'f', filename: path });
    await g.add({ driver: 'qcow2', 'node-name': 'd', file: 'f' });
    const cases: [unknown, string][] = [
      [{ driver: 'raw', 'node-name': 'd', file: 'f' }, "Cannot change the option 'driver'"],
      [
        { driver: 'file', 'node-name': 'f', filename: other },
        "Cannot change the option 'filename'",
      ],
      [
        { driver: 'file', 'node-name': 'f', filename: path, locking: 'off' },
        "Cannot change the option 'locking'",
      ],
      [
        { driver: 'qcow2', 'node-name': 'd', file: 'f', 'read-only': true, 'force-share': true },
        "Cannot change the option 'force-share'",
      ],
      [
        { driver: 'qcow2', 'node-name': 'nope', file: 'f' },
        "Failed to find node with node-name='nope'",
      ],
      [{ driver: 'qcow2', file: 'f' }, 'node-name not specified'],
      [{ driver: 'qcow2', 'node-name': 'd' }, "Parameter 'options[0].file' is missing"],
      [
        { driver: 'file', 'node-name': 'f', filename: path, 'read-only': true },
        "Read-only block node 'f' cannot support read-write users",
      ],
    ];
    for (const [options, message] of cases) {
      await expect(g.reopenMultiple([options])).rejects.toThrow(message);
    }
    expect(readOnlyOf(g)).toEqual({ d: false, f: false });
    // qcow2's own options may change.
    await g.reopenMultiple([
      { driver: 'qcow2', 'node-name': 'd', file: 'f', 'lazy-refcounts': true },
    ]);
    const b = await g.createBackend('d', { write: true });
    await b.write(0, pattern(3, 0, 4096));
    await b.close();
  });

  it('going read-write is refused while another process shares no write; nothing changes', async () => {
    const path = qcow2('held.qcow2');
    const g = graph();
    await g.add({
      driver: 'qcow2',
      'node-name': 'd',
      'read-only': true,
      file: { driver: 'file', 'node-name': 'f', filename: path },
    });
    const held = await QemuIoSession.open(['-r', '-f', 'qcow2', path]);
    try {
      await expect(g.reopen('d', { 'read-only': false })).rejects.toThrow(
        'Failed to get "write" lock',
      );
      expect(readOnlyOf(g)).toEqual({ d: true, f: true });
    } finally {
      await held.quit();
    }
    await g.reopen('d', { 'read-only': false });
    expect(readOnlyOf(g)).toEqual({ d: false, f: false });
  });
});
