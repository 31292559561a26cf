// x-debug-query-block-graph against qemu-storage-daemon 7.2 on the same graph (the same
// vertices and edges, each edge taking and sharing the same permissions), and `vm-disk
// graph` drawing it from either daemon's monitor.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, monitorArgs, run, startQsd, useScratch } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-graph-');

interface Graph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; name: string; perm: string[]; 'shared-perm': string[] }[];
}

/** The edges by the names of their ends (ids differ between daemons), sorted. */
function edgesByName(g: Graph, backendName: (name: string) => string): string[] {
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const label = (id: number) => {
    const n = byId.get(id)!;
    return n.type === 'block-driver' ? n.name : `${n.type}:${backendName(n.name)}`;
  };
  return g.edges
    .map(
      (e) =>
        `${label(e.parent)} -${e.name}-> ${label(e.child)} perm=${[...e.perm].sort()} shared=${[...e['shared-perm']].sort()}`,
    )
    .sort();
}

async function query(qmp: string): Promise<Graph> {
  const { client } = await QmpTestClient.connect(qmp);
  await client.execute({ execute: 'qmp_capabilities' });
  const reply = await client.execute({ execute: 'x-debug-query-block-graph' });
  client.close();
  return reply.return as Graph;
}

async function daemonArgs(): Promise<string[]> {
  const base = scratch.path('base.qcow2');
  const top = scratch.path('top.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  return [
    '--blockdev',
    `driver=file,node-name=base-file,filename=${base}`,
    '--blockdev',
    'driver=qcow2,node-name=base,file=base-file',
    '--blockdev',
    `driver=file,node-name=top-file,filename=${top}`,
    '--blockdev',
    'driver=qcow2,node-name=top,file=top-file,backing=base',
    '--nbd-server',
    `addr.type=unix,addr.path=${scratch.path('nbd.sock')}`,
    '--export',
    'type=nbd,id=e0,node-name=top,writable=on',
  ];
}

describe('x-debug-query-block-graph', () => {
  it("has qemu-storage-daemon's vertices, edges and permissions", async () => {
    const args = await daemonArgs();
    const ourQmp = scratch.path('ours.qmp');
    const ourDaemon = await scratch.serve([...monitorArgs(ourQmp), ...args]);
    const ours = await query(ourQmp);
    // One at a time: each locks the images.
    await ourDaemon.stop();
    const theirQmp = scratch.path('theirs.qmp');
    scratch.running.push(await startQsd([...monitorArgs(theirQmp), ...args], theirQmp));
    const theirs = await query(theirQmp);

    // QEMU names an export's BlockBackend '' (anonymous); vm-disk names it after the export.
    expect(edgesByName(ours, () => '')).toEqual(edgesByName(theirs, () => ''));
    expect(ours.nodes.map((n) => n.type).sort()).toEqual(theirs.nodes.map((n) => n.type).sort());
    expect(ours.nodes.find((n) => n.type === 'block-backend')?.name).toBe('export:e0');
  });

  it('an exported node cannot be resized, as in qemu-storage-daemon (the export does not share resize)', async () => {
    const args = await daemonArgs();
    const replies: unknown[] = [];
    for (const which of ['vm-disk', 'qsd'] as const) {
      const qmp = scratch.path(`${which}.qmp`);
      const p =
        which === 'qsd'
          ? await startQsd([...monitorArgs(qmp), ...args], qmp)
          : await scratch.serve([...monitorArgs(qmp), ...args]);
      scratch.running.push(p);
      const { client } = await QmpTestClient.connect(qmp);
      await client.execute({ execute: 'qmp_capabilities' });
      replies.push(
        await client.execute({
          execute: 'block_resize',
          arguments: { 'node-name': 'top', size: 2 << 20 },
        }),
      );
      client.close();
      await p.stop();
    }
    expect(replies[0]).toEqual(replies[1]);
    expect(replies[0]).toMatchObject({ error: { class: 'GenericError' } });
  });

  it('vm-disk graph draws it as DOT, and as SVG through dot', async () => {
    const qmp = scratch.path('qmp');
    await scratch.serve([...monitorArgs(qmp), ...(await daemonArgs())]);
    const dot = await run(process.execPath, [CLI, 'graph', qmp]);
    expect(dot).toMatch(/^digraph "block graph" \{/);
    expect(dot).toContain(`"top\\nqcow2\\n${scratch.path('top.qcow2')}"`);
    expect(dot).toMatch(/\[shape=house, label="export:e0"\]/);
    expect(dot).toMatch(/-> n\d+ \[label="backing\\n/);
    // Graphviz reads it.
    const svg = scratch.path('g.svg');
    await run(process.execPath, [CLI, 'graph', '--format', 'svg', '-o', svg, qmp]);
    expect(readFileSync(svg, 'utf8')).toContain('<svg');
    expect(readFileSync(svg, 'utf8')).toContain('export:e0');
  });

  it('vm-disk graph: a socket nobody listens on is a clear error, exit 1', () => {
    const r = spawnSync(process.execPath, [CLI, 'graph', scratch.path('nothing.sock')], {
      encoding: 'utf8',
    });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/cannot connect to the QMP monitor .*nothing\.sock/);
  });
});
