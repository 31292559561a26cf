// query-blockstats, side by side with qemu-storage-daemon 7.2: the same images, the same
// I/O through an NBD export (qemu-io), the same query. The replies have QEMU's keys; the
// counts are those of the I/O done (qemu-storage-daemon counts only at BlockBackends,
// which its exports keep anonymous: its nodes show zeros, and the highest offset written,
// which both count per node and must agree on).
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-blockstats-');

type Entry = Record<string, unknown> & { 'node-name': string; stats: Record<string, unknown> };

async function session(qmp: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(qmp);
  await client.execute({ execute: 'qmp_capabilities' });
  return client;
}

/** vm-disk and qemu-storage-daemon, each serving its own copy of a qcow2 image over NBD. */
async function pair(): Promise<{ name: string; qmp: QmpTestClient; nbd: string }[]> {
  const out = [];
  for (const name of ['vm-disk', 'qsd']) {
    const img = scratch.path(`${name}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    const qmp = scratch.path(`${name}.qmp`);
    const nbd = scratch.path(`${name}.nbd`);
    const args = [
      '--blockdev',
      `driver=file,node-name=f0,filename=${img}`,
      '--blockdev',
      'driver=qcow2,node-name=d0,file=f0',
      '--nbd-server',
      `addr.type=unix,addr.path=${nbd}`,
      '--export',
      'type=nbd,id=e0,node-name=d0,writable=on',
      ...monitorArgs(qmp),
    ];
    if (name === 'qsd') scratch.running.push(await startQsd(args, qmp));
    else await scratch.serve(args);
    out.push({ name, qmp: await session(qmp), nbd });
  }
  return out;
}

const IO = ['write -P 1 0 64k', 'read 0 4k', 'read 64k 8k', 'flush', 'write -z 1M 64k'];

/** The keys of an entry, nested (stats, parent, driver-specific), sorted. */
function keys(e: Record<string, unknown>, prefix = ''): string[] {
  return Object.entries(e)
    .flatMap(([k, v]) =>
      v && typeof v === 'object' && !Array.isArray(v)
        ? [`${prefix}${k}`, ...keys(v as Record<string, unknown>, `${prefix}${k}.`)]
        : [`${prefix}${k}`],
    )
    .sort();
}

describe('query-blockstats', () => {
  it('answers with qemu-storage-daemon 7.2 keys, and counts the I/O of an NBD export', async () => {
    const daemons = await pair();
    const replies: Record<
      string,
      { devices: QmpMessage; nodes: Entry[]; bad: QmpMessage; intervals: QmpMessage }
    > = {};
    for (const d of daemons) {
      await run('qemu-io', [
        '-f',
        'raw',
        ...IO.flatMap((c) => ['-c', c]),
        `nbd+unix:///d0?socket=${d.nbd}`,
      ]);
      const nodes = await d.qmp.execute({
        execute: 'query-blockstats',
        arguments: { 'query-nodes': true },
      });
      replies[d.name] = {
        devices: await d.qmp.execute({ execute: 'query-blockstats' }),
        nodes: (nodes.return as Entry[]).sort((a, b) =>
          a['node-name'].localeCompare(b['node-name']),
        ),
        bad: await d.qmp.execute({ execute: 'query-blockstats', arguments: { 'query-nodes': 1 } }),
        // Interval statistics are a -drive option in QEMU 7.2, not an argument.
        intervals: await d.qmp.execute({
          execute: 'query-blockstats',
          arguments: { 'query-nodes': true, 'stats-intervals': [2] },
        }),
      };
    }
    const ours = replies['vm-disk']!;
    const theirs = replies.qsd!;
    // No named BlockBackends: exports' backends are anonymous in both.
    expect(ours.devices).toEqual({ return: [] });
    expect(theirs.devices).toEqual({ return: [] });
    expect(ours.bad).toEqual(theirs.bad);
    expect(ours.intervals).toEqual(theirs.intervals);
    expect(theirs.intervals).toMatchObject({ error: { class: 'GenericError' } });
    expect(ours.nodes.map((n) => n['node-name'])).toEqual(['d0', 'f0']);
    expect(theirs.nodes.map((n) => n['node-name'])).toEqual(['d0', 'f0']);
    for (const [i, node] of ours.nodes.entries()) {
      // The same keys; idle_time_ns (optional in BlockDeviceStats) once a node did I/O.
      const optional = (k: string) => k.endsWith('idle_time_ns');
      expect(keys(node).filter((k) => !optional(k))).toEqual(keys(theirs.nodes[i]!));
    }
    const [d0, f0] = ours.nodes as [Entry, Entry];
    // The export's requests, at the node it exports (qemu-io flushes once more as it closes).
    expect(d0.stats).toMatchObject({
      rd_operations: 2,
      rd_bytes: 12288,
      wr_operations: 2,
      wr_bytes: 65536,
      failed_rd_operations: 0,
      failed_wr_operations: 0,
      invalid_wr_operations: 0,
    });
    expect(d0.stats.flush_operations).toBeGreaterThanOrEqual(1);
    expect(d0.stats.rd_total_time_ns).toBeGreaterThan(0);
    expect(d0.stats.idle_time_ns).toBeGreaterThanOrEqual(0);
    // What the qcow2 driver asked of its file: the data, and its metadata.
    expect(f0.stats.wr_bytes).toBeGreaterThanOrEqual(65536);
    expect(d0.parent).toMatchObject({ 'node-name': 'f0' });
    // The highest offset written: counted per node by both.
    const wrHighest = (e: Entry) => e.stats.wr_highest_offset;
    expect(wrHighest(d0)).toBe((1 << 20) + 65536);
    expect(wrHighest(d0)).toBe(wrHighest(theirs.nodes[0]!));
  });
});
