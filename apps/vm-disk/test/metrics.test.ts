// `vm-disk serve --metrics`: the Prometheus text format at /metrics (node, export and NBD
// server metrics, latency histograms), /healthz, on TCP or a unix socket; bad options.
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { CLI, run, start, useScratch } from './harness/daemon.ts';
import { httpGet, sample, serveWithMetrics } from './harness/metrics.ts';

const scratch = useScratch('vmdisk-metrics-');

describe('vm-disk serve --metrics', () => {
  it('serves the nodes and exports counters, histograms and health', async () => {
    const { nbd, port } = await serveWithMetrics(scratch);
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 1 0 64k',
      '-c',
      'write -P 2 1M 4k',
      '-c',
      'read 0 4k',
      '-c',
      'write -z 2M 64k',
      `nbd+unix:///d0?socket=${nbd}`,
    ]);
    const health = await httpGet({ port }, '/healthz');
    expect(health).toMatchObject({ status: 200, body: 'serving\n' });
    const m = await httpGet({ port }, '/metrics');
    expect(m.status).toBe(200);
    expect(m.type).toMatch(/^text\/plain; version=0\.0\.4/);
    const t = m.body;
    expect(sample(t, 'vmdisk_up')).toBe(1);
    expect(sample(t, 'vmdisk_node_requests_total{node="d0",operation="write"}')).toBe(2);
    expect(sample(t, 'vmdisk_node_bytes_total{node="d0",operation="write"}')).toBe(69632);
    expect(sample(t, 'vmdisk_node_requests_total{node="d0",operation="read"}')).toBe(1);
    expect(sample(t, 'vmdisk_node_requests_total{node="d0",operation="zero"}')).toBe(1);
    expect(sample(t, 'vmdisk_node_requests_in_flight{node="d0",operation="write"}')).toBe(0);
    expect(sample(t, 'vmdisk_node_write_highest_offset_bytes{node="d0"}')).toBe(
      2 * 2 ** 20 + 65536,
    );
    // The file node below counts the qcow2 driver's requests (data and metadata).
    expect(sample(t, 'vmdisk_node_requests_total{node="f0",operation="write"}')).toBeGreaterThan(0);
    // A histogram: cumulative buckets ending in +Inf, equal to the count.
    const h = 'vmdisk_node_request_duration_seconds';
    const labels = 'node="d0",operation="write"';
    expect(sample(t, `${h}_bucket{${labels},le="+Inf"}`)).toBe(2);
    expect(sample(t, `${h}_count{${labels}}`)).toBe(2);
    expect(sample(t, `${h}_sum{${labels}}`)).toBeGreaterThan(0);
    expect(t).toMatch(/^# TYPE vmdisk_node_request_duration_seconds histogram$/m);
    // NBD: the export's requests by type, its connections, the server's counters.
    expect(sample(t, 'vmdisk_export_requests_total{export="e0",operation="write"}')).toBe(2);
    expect(sample(t, 'vmdisk_export_requests_total{export="e0",operation="zero"}')).toBe(1);
    // The export's bytes written include those it zeroed.
    expect(sample(t, 'vmdisk_export_bytes_total{export="e0",operation="write"}')).toBe(135168);
    expect(sample(t, 'vmdisk_export_connections_total{export="e0"}')).toBe(1);
    expect(sample(t, 'vmdisk_export_info{export="e0",name="e0",node="d0"}')).toBeUndefined();
    expect(sample(t, 'vmdisk_export_info{export="e0",name="d0",node="d0"}')).toBe(1);
    expect(sample(t, 'vmdisk_nbd_connections_total')).toBe(1);
    expect(sample(t, 'vmdisk_nbd_negotiation_failures_total')).toBe(0);
    expect(sample(t, 'vmdisk_nbd_tls_handshakes_total')).toBe(0);
    // Process metrics come along (under prom-client's default names).
    expect(t).toMatch(/^vmdisk_process_cpu_seconds_total /m);
    expect(sample(t, 'vmdisk_process_resident_memory_bytes')).toBeGreaterThan(1 << 20);
    expect(sample(t, 'vmdisk_process_open_fds')).toBeGreaterThan(3);
    expect((await httpGet({ port }, '/nope')).status).toBe(404);
  });

  it('listens on a unix socket', async () => {
    const sock = scratch.path('metrics.sock');
    await scratch.serve(['--metrics', `addr.type=unix,addr.path=${sock}`]);
    expect(await httpGet({ socketPath: sock }, '/health')).toMatchObject({ status: 200 });
    const m = await httpGet({ socketPath: sock }, '/metrics');
    expect(sample(m.body, 'vmdisk_up')).toBe(1);
  });

  it('refuses a bad --metrics and a second one, naming the option', async () => {
    const bad = start(process.execPath, [
      CLI,
      'serve',
      '--metrics',
      'addr.type=inet,addr.host=127.0.0.1',
    ]);
    expect(await bad.exited).toBe(2);
    expect(bad.stderr()).toMatch(/--metrics: .*addr\.port/);
    const twice = start(process.execPath, [
      CLI,
      'serve',
      '--metrics',
      `addr.type=unix,addr.path=${scratch.path('a')}`,
      '--metrics',
      `addr.type=unix,addr.path=${scratch.path('b')}`,
    ]);
    expect(await twice.exited).toBe(2);
    expect(twice.stderr()).toMatch(/--metrics: only one --metrics can be given/);
  });

  it('fails to start, cleanly, when the metrics address is taken', async () => {
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const { port } = taken.address() as { port: number };
    try {
      const nbd = scratch.path('nbd.sock');
      const p = start(process.execPath, [
        CLI,
        'serve',
        '--nbd-server',
        `addr.type=unix,addr.path=${nbd}`,
        '--metrics',
        `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
      ]);
      expect(await p.exited).toBe(1);
      expect(p.stderr()).toMatch(`vm-disk: cannot listen on 127.0.0.1:${port}`);
      // What had started is undone: the NBD socket is gone.
      expect(existsSync(nbd)).toBe(false);
    } finally {
      taken.close();
    }
  });
});
