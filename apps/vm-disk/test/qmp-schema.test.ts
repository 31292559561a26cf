// query-qmp-schema: vm-disk's introspection is whole (every command and event it has is
// there, every type a name refers to is defined, every command listed answers), agrees
// with what the monitor accepts, and agrees with qemu-storage-daemon 7.2's for the
// commands both have (the same argument names, equally optional, of the same JSON kind).
import { describe, expect, it } from 'vitest';
import { monitorArgs, run, startQsd, useScratch, waitFor } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

type SchemaInfo = { name: string; 'meta-type': string } & Record<string, unknown>;
type Member = { name: string; type: string; default?: null };
type Variant = { case: string; type: string };

/**
 * vm-disk's own arguments, beyond QEMU's (docs/architecture.md): a throttle node's own
 * limits without a group object (so throttle-group is optional), and the NBD server's
 * memory budget for requests in flight.
 */
const EXTENSIONS = [
  'blockdev-add (throttle): throttle-group',
  'blockdev-add (throttle): limits',
  'nbd-server-start: request-memory-budget',
];

const scratch = useScratch('vmdisk-qmp-schema-');

async function session(qmp: string): Promise<QmpTestClient> {
  const { client } = await QmpTestClient.connect(qmp);
  await client.execute({ execute: 'qmp_capabilities' });
  return client;
}

async function ok(client: QmpTestClient, execute: string, args?: QmpMessage): Promise<unknown> {
  const reply = await client.execute({ execute, ...(args && { arguments: args }) });
  if (!('return' in reply)) throw new Error(`${execute}: ${JSON.stringify(reply)}`);
  return reply.return;
}

async function schemaOf(client: QmpTestClient): Promise<Map<string, SchemaInfo>> {
  const list = (await ok(client, 'query-qmp-schema')) as SchemaInfo[];
  const byName = new Map<string, SchemaInfo>();
  for (const e of list) {
    expect(byName.has(e.name), `${e.name} defined once`).toBe(false);
    byName.set(e.name, e);
  }
  return byName;
}

/** The names `e` refers to. */
function references(e: SchemaInfo): string[] {
  const refs: string[] = [];
  for (const k of ['arg-type', 'ret-type', 'element-type'] as const) {
    if (typeof e[k] === 'string') refs.push(e[k]);
  }
  if (e['meta-type'] === 'object') {
    for (const m of e.members as Member[]) refs.push(m.type);
    for (const v of (e.variants as { type: string }[] | undefined) ?? []) refs.push(v.type);
  }
  if (e['meta-type'] === 'alternate') for (const m of e.members as Member[]) refs.push(m.type);
  return refs;
}

/** The JSON kind a type name stands for, as far as a client can rely on it. */
function kind(schema: Map<string, SchemaInfo>, name: string): string {
  const e = schema.get(name);
  if (!e) return `missing ${name}`;
  if (e['meta-type'] === 'builtin') return String(e['json-type']);
  if (e['meta-type'] === 'array') return `array of ${kind(schema, String(e['element-type']))}`;
  return e['meta-type'];
}

describe('query-qmp-schema', () => {
  it('lists every command and declared event; every name it uses is defined', async () => {
    const qmp = scratch.path('qmp');
    await scratch.serve(monitorArgs(qmp));
    const client = await session(qmp);
    const schema = await schemaOf(client);
    const commands = (await ok(client, 'query-commands')) as { name: string }[];
    for (const { name } of commands) {
      expect(schema.get(name)?.['meta-type'], name).toBe('command');
    }
    const listed = [...schema.values()].filter((e) => e['meta-type'] === 'command');
    expect(listed.map((e) => e.name).sort()).toEqual(commands.map((c) => c.name).sort());
    for (const event of ['JOB_STATUS_CHANGE', 'BLOCK_JOB_COMPLETED', 'BLOCK_EXPORT_DELETED']) {
      expect(schema.get(event)?.['meta-type'], event).toBe('event');
    }
    for (const e of schema.values()) {
      for (const ref of references(e)) expect(schema.has(ref), `${e.name} -> ${ref}`).toBe(true);
    }
    // Every command it lists is served: a made-up argument is refused by the command's
    // own argument check (nothing runs), never answered CommandNotFound.
    for (const e of listed) {
      if (e.name === 'qmp_capabilities') continue;
      const reply = await client.execute({ execute: e.name, arguments: { 'x-probe': 1 } });
      expect(reply.error, e.name).toMatchObject({ class: 'GenericError' });
    }
    client.close();
  });

  it('describes the arguments the monitor checks: blockdev-add is a union on driver', async () => {
    const qmp = scratch.path('qmp');
    await scratch.serve(monitorArgs(qmp));
    const client = await session(qmp);
    const schema = await schemaOf(client);
    const args = schema.get(String(schema.get('blockdev-add')?.['arg-type']))!;
    expect(args.tag).toBe('driver');
    const cases = (args.variants as { case: string; type: string }[]).map((v) => v.case);
    expect(cases).toEqual(expect.arrayContaining(['file', 'qcow2', 'raw', 'nbd', 'throttle']));
    const qcow2 = (args.variants as { case: string; type: string }[]).find(
      (v) => v.case === 'qcow2',
    )!;
    const members = (schema.get(qcow2.type)!.members as Member[]).map((m) => m.name);
    expect(members).toContain('file');
    // The monitor refuses what the schema does not list.
    const reply = await client.execute({
      execute: 'blockdev-add',
      arguments: { driver: 'null-co', 'node-name': 'n0', 'x-not-in-schema': true },
    });
    expect(reply.error).toMatchObject({ class: 'GenericError' });
    expect(await ok(client, 'blockdev-add', { driver: 'null-co', 'node-name': 'n1' })).toEqual({});
    client.close();
  });

  it("agrees with qemu-storage-daemon's on the commands both have", async () => {
    const ourQmp = scratch.path('ours.qmp');
    const theirQmp = scratch.path('theirs.qmp');
    await scratch.serve(monitorArgs(ourQmp));
    scratch.running.push(await startQsd(monitorArgs(theirQmp), theirQmp));
    const oursClient = await session(ourQmp);
    const theirsClient = await session(theirQmp);
    const ours = await schemaOf(oursClient);
    const theirs = await schemaOf(theirsClient);
    const mismatches: string[] = [];
    let compared = 0;
    for (const e of ours.values()) {
      const q = theirs.get(e.name);
      if (e['meta-type'] !== 'command' && e['meta-type'] !== 'event') continue;
      if (!q) continue;
      compared++;
      const ourArgs = ours.get(String(e['arg-type']))!;
      if (ourArgs['meta-type'] !== 'object') {
        mismatches.push(`${e.name}: arguments not described (${ourArgs.name})`);
        continue;
      }
      const theirArgs = theirs.get(String(q['arg-type']))!;
      compareMembers(e.name, ourArgs, theirArgs);
      // A union: each of our variants against QEMU's of the same case.
      const theirVariants = new Map(
        ((theirArgs.variants as Variant[] | undefined) ?? []).map((v) => [v.case, v.type]),
      );
      for (const v of (ourArgs.variants as Variant[] | undefined) ?? []) {
        const t = theirVariants.get(v.case);
        if (t === undefined) mismatches.push(`${e.name}: ${v.case} unknown to QEMU`);
        else compareMembers(`${e.name} (${v.case})`, ours.get(v.type)!, theirs.get(t)!);
      }
    }
    function compareMembers(what: string, o: SchemaInfo, t: SchemaInfo): void {
      const theirMembers = t.members as Member[];
      const theirOrder = theirMembers.map((m) => m.name);
      let last = -1;
      for (const m of o.members as Member[]) {
        if (EXTENSIONS.includes(`${what}: ${m.name}`)) continue;
        const at = theirOrder.indexOf(m.name);
        if (at < 0) {
          mismatches.push(`${what}: ${m.name} unknown to QEMU`);
          continue;
        }
        if (at < last) mismatches.push(`${what}: ${m.name} out of QEMU's order`);
        last = at;
        const tm = theirMembers[at]!;
        if ('default' in m !== 'default' in tm) {
          mismatches.push(`${what}: ${m.name} optional ${'default' in m} vs ${'default' in tm}`);
        }
        const k = kind(ours, m.type);
        // Where vm-disk checks a value by code of its own (any), QEMU's type is finer.
        if (!k.endsWith('value') && k !== kind(theirs, tm.type)) {
          mismatches.push(`${what}: ${m.name} is ${k}, QEMU's ${kind(theirs, tm.type)}`);
        }
      }
    }
    expect(compared).toBeGreaterThan(30);
    expect(mismatches).toEqual([]);
    oursClient.close();
    theirsClient.close();
  });

  it('declares every event a job sends', async () => {
    const base = scratch.path('base.qcow2');
    const top = scratch.path('top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const qmp = scratch.path('qmp');
    const p = await scratch.serve([
      ...monitorArgs(qmp),
      '--blockdev',
      `driver=qcow2,node-name=base,file.driver=file,file.filename=${base}`,
      '--blockdev',
      `driver=qcow2,node-name=top,backing=base,file.driver=file,file.filename=${top}`,
    ]);
    const client = await session(qmp);
    await ok(client, 'block-stream', { 'job-id': 'j', device: 'top' });
    // The job's last status change is logged (after its events were sent).
    await waitFor('the job to end', () => p.stderr().includes('"status":"null"'));
    expect(p.stderr()).not.toContain('qmp-event-undeclared');
    client.close();
  });
});
