// qom-list / qom-get / qom-set on the objects and chardevs, chardev-add / chardev-remove /
// query-chardev, and the commands qemu-storage-daemon 7.2 does not have: the same QMP
// sequence on qemu-storage-daemon and on vm-disk (one after the other, on the same paths)
// gets the same replies. QOM lists properties and chardevs in hash order: compared sorted.
import { mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-qom-');

type Step = [execute: string, args?: Record<string, unknown>];

const byKey = (key: string) => (a: QmpMessage, b: QmpMessage) =>
  String(a[key]).localeCompare(String(b[key]));

/** A reply as compared: lists of properties or chardevs sorted. */
function normal(execute: string, reply: QmpMessage): QmpMessage {
  const r = reply.return;
  if (!Array.isArray(r)) return reply;
  if (execute === 'qom-list') return { return: [...r].sort(byKey('name')) };
  if (execute === 'query-chardev') return { return: [...r].sort(byKey('label')) };
  return reply;
}

/** Runs `steps` on each daemon (started with `args` and a monitor); returns both transcripts. */
async function transcripts(
  args: string[],
  steps: (Step | ((qmp: QmpTestClient) => Promise<void>))[],
): Promise<{ qsd: QmpMessage[]; ours: QmpMessage[] }> {
  const out: QmpMessage[][] = [];
  for (const which of ['qsd', 'vm-disk'] as const) {
    const qmp = scratch.path('m.qmp');
    const all = [...monitorArgs(qmp), ...args];
    const p = which === 'qsd' ? await startQsd(all, qmp) : await scratch.serve(all);
    if (which === 'qsd') scratch.running.push(p);
    const { client } = await QmpTestClient.connect(qmp);
    await client.execute({ execute: 'qmp_capabilities' });
    const seen: QmpMessage[] = [];
    for (const step of steps) {
      if (typeof step === 'function') {
        await step(client);
        continue;
      }
      const [execute, a] = step;
      const reply = await client.execute({ execute, ...(a && { arguments: a }) });
      seen.push({ execute, ...normal(execute, reply) });
    }
    await client.execute({ execute: 'quit' });
    await p.exited;
    client.close();
    out.push(seen);
  }
  return { qsd: out[0]!, ours: out[1]! };
}

describe('QOM, chardevs and absent commands, as qemu-storage-daemon 7.2', () => {
  it('qom-list, qom-get and qom-set of secret, throttle-group and tls-creds objects', async () => {
    const psk = scratch.path('psk');
    mkdirSync(psk);
    writeFileSync(`${psk}/keys.psk`, 'alice:0123456789abcdef\n');
    const x509 = scratch.path('x509');
    mkdirSync(x509);
    await run('openssl', [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      `${x509}/ca-key.pem`,
      '-out',
      `${x509}/ca-cert.pem`,
      '-days',
      '1',
      '-subj',
      '/CN=ca',
    ]);
    const args = [
      '--object',
      'secret,id=s0,data=c2VjcmV0,format=base64',
      '--object',
      'throttle-group,id=g0,x-iops-total=100',
      '--object',
      `tls-creds-psk,id=p0,dir=${psk},endpoint=server`,
      '--object',
      `tls-creds-x509,id=x0,dir=${x509},endpoint=client`,
    ];
    const get = (path: string, property: string): Step => ['qom-get', { path, property }];
    const set = (path: string, property: string, value: unknown): Step => [
      'qom-set',
      { path, property, value },
    ];
    const steps: Step[] = [
      ['qom-list', { path: '/' }],
      ['qom-list', { path: '/objects' }],
      ['qom-list', { path: 'objects' }],
      ['qom-list', { path: '//objects/' }],
      ['qom-list', { path: '' }],
      ['qom-list', { path: '/nope' }],
      ['qom-list', { path: 'nope' }],
      ...['s0', 'g0', 'p0', 'x0'].map((id): Step => ['qom-list', { path: `/objects/${id}` }]),
      ...['type', 'format', 'data', 'file', 'keyid', 'iv', 'loaded'].map((p) =>
        get('/objects/s0', p),
      ),
      get('s0', 'format'),
      get('/objects/s0', 'nope'),
      get('/objects/nope', 'x'),
      get('/', 'type'),
      get('/', 'objects'),
      get('/objects', 's0'),
      get('/objects/g0', 'limits'),
      get('/objects/g0', 'x-iops-total'),
      get('/objects/g0', 'x-bps-read-max-length'),
      ...['endpoint', 'dir', 'verify-peer', 'priority', 'username', 'loaded'].map((p) =>
        get('/objects/p0', p),
      ),
      ...['endpoint', 'sanity-check', 'passwordid'].map((p) => get('/objects/x0', p)),
      // Set after creation: limits merge into the live group; x-KEY is refused.
      set('/objects/g0', 'limits', { 'bps-read': 4096 }),
      get('/objects/g0', 'limits'),
      get('/objects/g0', 'x-iops-total'),
      set('/objects/g0', 'x-iops-total', 500),
      set('/objects/g0', 'limits', { bogus: 1 }),
      set('/objects/s0', 'data', 'eHl6'),
      get('/objects/s0', 'data'),
      set('/objects/s0', 'loaded', false),
      set('/objects/s0', 'type', 'x'),
      set('/objects/s0', 'nope', 'x'),
      set('/objects/nope', 'x', 'x'),
      set('/objects/p0', 'priority', 'NORMAL'),
      get('/objects/p0', 'priority'),
      set('/objects/p0', 'verify-peer', 'x'),
      ['object-del', { id: 's0' }],
      ['object-del', { id: 'g0' }],
      ['object-del', { id: 'p0' }],
      ['object-del', { id: 'x0' }],
      ['qom-list', { path: '/objects' }],
    ];
    const { qsd, ours } = await transcripts(args, steps);
    expect(ours).toEqual(qsd);
  });

  it('chardev-add and chardev-remove of sockets, query-chardev, /chardevs', async () => {
    const sock = scratch.path('c1.sock');
    const unixSocket = (id: string, path: string, extra = {}) => [
      'chardev-add',
      {
        id,
        backend: {
          type: 'socket',
          data: { addr: { type: 'unix', data: { path } }, server: true, wait: false, ...extra },
        },
      },
    ];
    let client: net.Socket | undefined;
    let closed: Promise<unknown> | undefined;
    const steps = [
      ['qom-list', { path: '/' }],
      unixSocket('c1', sock),
      unixSocket('c1', sock),
      unixSocket('c2', scratch.path('missing/c2.sock')),
      ['chardev-add', { id: 'n0', backend: { type: 'null', data: {} } }],
      ['query-chardev'],
      ['qom-list', { path: '/chardevs' }],
      ['qom-list', { path: '/chardevs/c1' }],
      ['qom-get', { path: '/chardevs/c1', property: 'addr' }],
      ['qom-get', { path: '/chardevs/c1', property: 'connected' }],
      ['qom-get', { path: 'c1', property: 'type' }],
      ['qom-get', { path: '/chardevs/n0', property: 'type' }],
      // A client of a chardev nobody reads: connected, held.
      async (qmp: QmpTestClient) => {
        client = net.connect(sock);
        // Flowing, so that the end of the connection is seen.
        client.resume();
        closed = new Promise((resolve) => client!.once('close', resolve));
        // Connected when the daemon has accepted it (QEMU's chardev says so).
        for (;;) {
          const reply = await qmp.execute({
            execute: 'qom-get',
            arguments: { path: '/chardevs/c1', property: 'connected' },
          });
          if (reply.return === true) break;
        }
      },
      ['qom-get', { path: '/chardevs/c1', property: 'connected' }],
      ['chardev-remove', { id: 'm0' }],
      ['chardev-remove', { id: 'nope' }],
      ['chardev-remove', { id: 'c1' }],
      async () => {
        // The client is let go with the chardev.
        await closed;
      },
      ['chardev-remove', { id: 'n0' }],
      ['query-chardev'],
    ] as (Step | ((qmp: QmpTestClient) => Promise<void>))[];
    const { qsd, ours } = await transcripts([], steps);
    expect(ours).toEqual(qsd);
    // The socket file went with the chardev.
    expect(await run('sh', ['-c', `test -e ${sock} && echo there || echo gone`])).toBe('gone\n');
  });

  it('answers CommandNotFound for what qemu-storage-daemon 7.2 lacks (no HMP, fds, iothreads)', async () => {
    const steps: Step[] = [
      ['human-monitor-command', { 'command-line': 'info block' }],
      ['getfd', { fdname: 'f' }],
      ['closefd', { fdname: 'f' }],
      ['add_client', { protocol: 'nbd', fdname: 'f' }],
      ['query-iothreads'],
      ['query-command-line-options'],
      ['query-status'],
      ['query-name'],
      ['query-version'],
    ];
    const { qsd, ours } = await transcripts([], steps);
    const version = (t: QmpMessage[]) =>
      t.map((m) => (m.execute === 'query-version' ? Object.keys(m.return as object).sort() : m));
    expect(version(ours)).toEqual(version(qsd));
  });
});
