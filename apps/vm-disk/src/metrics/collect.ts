// The metrics of `vm-disk serve --metrics`, in a prom-client registry. Nothing is counted
// here: each scrape reads the counters the I/O paths keep anyway (each node's
// BlockAcctStats, the NBD server's counters), so that metrics cost the I/O nothing more,
// and a node or export that is gone is gone from the next scrape. Labels: node, export,
// operation (a fixed set); the number of series is bounded by MAX_NODES and MAX_EXPORTS.
import {
  ACCT_TYPES,
  type AcctCounters,
  type BlockGraph,
  LATENCY_BUCKETS,
} from '@vmdisk/block-graph';
import type { NbdServer } from '@vmdisk/nbd';
import { Registry } from 'prom-client';
import { processSamples } from './process.ts';

/** What the metrics are read from (the daemon). */
export interface MetricsSource {
  readonly graph: BlockGraph;
  readonly serving: boolean;
  nbdExports(): {
    server: NbdServer | undefined;
    exports: { id: string; name: string; node: string }[];
  };
}

/** At most this many nodes and exports are shown (the rest counted in *_omitted). */
export const MAX_NODES = 256;
export const MAX_EXPORTS = 256;

/** NBD command types (the index of ExportStats.commands) by the operation label. */
const NBD_OPERATIONS: [string, number][] = [
  ['read', 0],
  ['write', 1],
  ['flush', 3],
  ['discard', 4],
  ['cache', 5],
  ['zero', 6],
  ['block-status', 7],
];

type Labels = Record<string, string>;
type Sample = { labels: Labels; value: number; metricName?: string };

/** A metric read at scrape time (prom-client's registry takes any object with get()). */
function metric(
  registry: Registry,
  name: string,
  help: string,
  type: 'counter' | 'gauge' | 'histogram',
  values: () => Sample[],
): void {
  registry.registerMetric({
    name,
    help,
    type,
    aggregator: 'sum',
    get: async () => ({ name, help, type, values: values(), aggregator: 'sum' }),
  } as unknown as Parameters<Registry['registerMetric']>[0]);
}

interface NodeCounters {
  node: string;
  wrHighestOffset: number;
  ops: [string, AcctCounters][];
}

/** The registry of a daemon's metrics. */
export function metricsRegistry(source: MetricsSource): Registry {
  const registry = new Registry();
  // The process's own figures, one reading per scrape.
  let proc: { at: number; samples: ReturnType<typeof processSamples> } | undefined;
  const procSamples = () => {
    const now = Date.now();
    if (!proc || now - proc.at >= 100) proc = { at: now, samples: processSamples('vmdisk_') };
    return proc.samples;
  };
  for (const { name, help, type } of processSamples('vmdisk_')) {
    metric(registry, name, help, type, () =>
      procSamples()
        .filter((x) => x.name === name)
        .map((x) => ({ labels: x.labels ?? {}, value: x.value })),
    );
  }

  // One read of the graph per scrape serves the node metrics that follow.
  let snapshot: { at: number; nodes: NodeCounters[]; omitted: number } | undefined;
  const nodes = () => {
    const now = Date.now();
    if (snapshot && now - snapshot.at < 100) return snapshot;
    const names = source.graph.query().map((n) => n['node-name']);
    snapshot = {
      at: now,
      omitted: Math.max(0, names.length - MAX_NODES),
      nodes: names.slice(0, MAX_NODES).map((node) => {
        const s = source.graph.nodeStats(node);
        return {
          node,
          wrHighestOffset: s.wrHighestOffset,
          ops: ACCT_TYPES.map((op) => [op, s.counters(op)] as [string, AcctCounters]),
        };
      }),
    };
    return snapshot;
  };
  const perOp = (f: (c: AcctCounters) => number) => () =>
    nodes().nodes.flatMap((n) =>
      n.ops.map(([operation, c]) => ({ labels: { node: n.node, operation }, value: f(c) })),
    );

  metric(
    registry,
    'vmdisk_up',
    'Whether the daemon is serving (1) or stopping (0).',
    'gauge',
    () => [{ labels: {}, value: source.serving ? 1 : 0 }],
  );
  metric(
    registry,
    'vmdisk_node_requests_total',
    'Requests completed by a block node, by operation.',
    'counter',
    perOp((c) => c.operations),
  );
  metric(
    registry,
    'vmdisk_node_bytes_total',
    'Bytes of the requests a block node completed, by operation.',
    'counter',
    perOp((c) => c.bytes),
  );
  metric(
    registry,
    'vmdisk_node_failed_requests_total',
    'Requests a block node failed (I/O errors), by operation.',
    'counter',
    perOp((c) => c.failed),
  );
  metric(
    registry,
    'vmdisk_node_invalid_requests_total',
    'Requests a block node refused (out of bounds, read-only), by operation.',
    'counter',
    perOp((c) => c.invalid),
  );
  metric(
    registry,
    'vmdisk_node_requests_in_flight',
    'Requests a block node is serving now, by operation.',
    'gauge',
    perOp((c) => c.inFlight),
  );
  metric(
    registry,
    'vmdisk_node_request_duration_seconds',
    'Latency of the requests a block node completed, by operation.',
    'histogram',
    () =>
      nodes().nodes.flatMap((n) =>
        n.ops.flatMap(([operation, c]) => {
          const labels = { node: n.node, operation };
          const out: Sample[] = [];
          let cumulative = 0;
          for (const [i, count] of c.latency.entries()) {
            cumulative += count;
            const le = i < LATENCY_BUCKETS.length ? String(LATENCY_BUCKETS[i]) : '+Inf';
            out.push({
              metricName: 'vmdisk_node_request_duration_seconds_bucket',
              labels: { ...labels, le },
              value: cumulative,
            });
          }
          out.push(
            {
              metricName: 'vmdisk_node_request_duration_seconds_sum',
              labels,
              value: c.totalTimeNs / 1e9,
            },
            { metricName: 'vmdisk_node_request_duration_seconds_count', labels, value: cumulative },
          );
          return out;
        }),
      ),
  );
  metric(
    registry,
    'vmdisk_node_write_highest_offset_bytes',
    'The end of the highest write a block node completed.',
    'gauge',
    () => nodes().nodes.map((n) => ({ labels: { node: n.node }, value: n.wrHighestOffset })),
  );
  metric(
    registry,
    'vmdisk_metrics_nodes_omitted',
    `Block nodes beyond the first ${MAX_NODES}, not shown.`,
    'gauge',
    () => [{ labels: {}, value: nodes().omitted }],
  );

  // NBD: the server's connections, and each export's.
  const nbd = () => {
    const { server, exports } = source.nbdExports();
    const shown = server ? exports.slice(0, MAX_EXPORTS) : [];
    return {
      server,
      exports: shown.map((e) => ({ ...e, stats: server!.exportStats(e.name) })),
    };
  };
  const serverCounter = (name: string, help: string, key: keyof NbdServer['counters']) =>
    metric(registry, name, help, 'counter', () => {
      const { server } = source.nbdExports();
      return [{ labels: {}, value: server ? server.counters[key] : 0 }];
    });
  serverCounter('vmdisk_nbd_connections_total', 'NBD connections accepted.', 'connections');
  serverCounter(
    'vmdisk_nbd_negotiation_failures_total',
    'NBD connections that failed before transmission (protocol, TLS, timeout).',
    'negotiationFailures',
  );
  serverCounter(
    'vmdisk_nbd_tls_handshakes_total',
    'NBD TLS handshakes that succeeded.',
    'tlsHandshakes',
  );
  metric(
    registry,
    'vmdisk_export_info',
    'An NBD export: its id, NBD name and the node it serves.',
    'gauge',
    () =>
      nbd().exports.map((e) => ({
        labels: { export: e.id, name: e.name, node: e.node },
        value: 1,
      })),
  );
  const perExport = (
    name: string,
    help: string,
    type: 'counter' | 'gauge',
    f: (s: ReturnType<NbdServer['exportStats']>) => number,
  ) =>
    metric(registry, name, help, type, () =>
      nbd().exports.map((e) => ({ labels: { export: e.id }, value: f(e.stats) })),
    );
  perExport(
    'vmdisk_export_connections',
    'NBD clients connected to an export now.',
    'gauge',
    (s) => s.connections,
  );
  perExport(
    'vmdisk_export_connections_total',
    'NBD clients that reached an export.',
    'counter',
    (s) => s.connectionsTotal,
  );
  perExport(
    'vmdisk_export_errors_total',
    'NBD requests an export answered with an error.',
    'counter',
    (s) => s.errors,
  );
  perExport(
    'vmdisk_export_requests_in_flight',
    'NBD requests an export is serving now.',
    'gauge',
    (s) => s.inFlight,
  );
  metric(
    registry,
    'vmdisk_export_requests_total',
    'NBD requests an export received, by operation.',
    'counter',
    () =>
      nbd().exports.flatMap((e) =>
        NBD_OPERATIONS.map(([operation, type]) => ({
          labels: { export: e.id, operation },
          value: e.stats.commands[type] ?? 0,
        })),
      ),
  );
  metric(
    registry,
    'vmdisk_export_bytes_total',
    'Bytes an export read or wrote for its clients (write: data and zeroes), by operation.',
    'counter',
    () =>
      nbd().exports.flatMap((e) => [
        { labels: { export: e.id, operation: 'read' }, value: e.stats.bytesRead },
        { labels: { export: e.id, operation: 'write' }, value: e.stats.bytesWritten },
      ]),
  );
  return registry;
}
