// query-blockstats in QEMU 7.2's shape (qapi/block-core.json BlockStats, block/qapi.c
// bdrv_query_bds_stats), from the nodes' I/O accounting (@vmdisk/block-graph's
// BlockAcctStats). QEMU lists named BlockBackends (devices) unless asked for nodes;
// qemu-storage-daemon has none (its exports' backends are anonymous), so without
// query-nodes the answer is [] there as here. With query-nodes every named node comes with
// the requests its parents made of it: QEMU counts those only at a BlockBackend (its nodes
// show zeros), vm-disk at every node, under the same keys.
import { type BlockAcctStats, type BlockGraph, type NodeInfo, schema } from '@vmdisk/block-graph';
import type { QmpMonitor } from './monitor.ts';

const { bool, opt, struct } = schema;

/** BlockDeviceStats: QEMU's keys; write-zeroes count as writes of no bytes (as virtio-blk's). */
export function blockDeviceStats(s: BlockAcctStats): Record<string, unknown> {
  const rd = s.counters('read');
  const wr = s.counters('write');
  const zero = s.counters('zero');
  const flush = s.counters('flush');
  const unmap = s.counters('discard');
  const idle = s.idleTimeNs();
  return {
    rd_bytes: rd.bytes,
    wr_bytes: wr.bytes,
    unmap_bytes: unmap.bytes,
    rd_operations: rd.operations,
    wr_operations: wr.operations + zero.operations,
    flush_operations: flush.operations,
    unmap_operations: unmap.operations,
    rd_total_time_ns: rd.totalTimeNs,
    wr_total_time_ns: wr.totalTimeNs + zero.totalTimeNs,
    flush_total_time_ns: flush.totalTimeNs,
    unmap_total_time_ns: unmap.totalTimeNs,
    wr_highest_offset: s.wrHighestOffset,
    // Requests are never merged here.
    rd_merged: 0,
    wr_merged: 0,
    unmap_merged: 0,
    ...(idle !== undefined && { idle_time_ns: idle }),
    failed_rd_operations: rd.failed,
    failed_wr_operations: wr.failed + zero.failed,
    failed_flush_operations: flush.failed,
    failed_unmap_operations: unmap.failed,
    invalid_rd_operations: rd.invalid,
    invalid_wr_operations: wr.invalid + zero.invalid,
    invalid_flush_operations: flush.invalid,
    invalid_unmap_operations: unmap.invalid,
    account_invalid: true,
    account_failed: true,
    // Interval statistics are a -drive option (stats-intervals) QEMU's blockdev-add lacks.
    timed_stats: [],
  };
}

/** The child whose stats QEMU shows as `parent`: the primary one storing data, or the only data child. */
function dataChild(n: NodeInfo): string | undefined {
  const primary = n.children.find((c) => c.role.includes('primary'));
  if (primary && (primary.role.includes('data') || primary.role.includes('filtered'))) {
    return primary['node-name'];
  }
  const data = n.children.filter((c) => c.role.includes('data'));
  return data.length === 1 ? data[0]?.['node-name'] : undefined;
}

/** One node's BlockStats (node level: no backing, as QEMU's with query-nodes). */
function nodeStats(
  graph: BlockGraph,
  byName: Map<string, NodeInfo>,
  n: NodeInfo,
): Record<string, unknown> {
  const s = graph.nodeStats(n['node-name']);
  const out: Record<string, unknown> = {
    'node-name': n['node-name'],
    stats: blockDeviceStats(s),
  };
  if (n.driver === 'file') {
    // BlockStatsSpecificFile: the discards the file node was asked for.
    const unmap = s.counters('discard');
    out['driver-specific'] = {
      driver: 'file',
      'discard-nb-ok': unmap.operations,
      'discard-nb-failed': unmap.failed,
      'discard-bytes-ok': unmap.bytes,
    };
  }
  const child = dataChild(n);
  const info = child !== undefined ? byName.get(child) : undefined;
  if (info) out.parent = nodeStats(graph, byName, info);
  return out;
}

export function queryBlockstats(graph: BlockGraph, queryNodes: boolean): unknown[] {
  if (!queryNodes) return [];
  const nodes = graph.query();
  const byName = new Map(nodes.map((n) => [n['node-name'], n]));
  return nodes.map((n) => nodeStats(graph, byName, n));
}

export function registerStatsCommands(monitor: QmpMonitor, graph: BlockGraph): void {
  monitor.register({
    name: 'query-blockstats',
    args: struct({ 'query-nodes': opt(bool) }),
    run: (args) => queryBlockstats(graph, args['query-nodes'] ?? false),
  });
}
