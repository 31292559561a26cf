// The QMP monitor, checked on its own and against qemu-storage-daemon: the same requests
// sent to both get replies of the same shape and error class.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { schema } from '@vmdisk/block-graph';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpError, QmpMonitor } from '../src/qmp/monitor.ts';
import { monitorArgs } from './harness/daemon.ts';
import { QmpTestClient } from './harness/qmp-client.ts';

let dir: string;
let monitor: QmpMonitor;
let qsd: ChildProcess;
const ours = () => join(dir, 'vm-disk.sock');
const theirs = () => join(dir, 'qsd.sock');

async function waitForSocket(path: string): Promise<void> {
  for (let i = 0; i < 100 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 50));
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-qmp-'));
  monitor = new QmpMonitor({ qemu: { major: 7, minor: 2, micro: 0 }, package: 'vm-disk test' });
  monitor.register({
    name: 'test-echo',
    args: schema.struct({ text: schema.str, times: schema.opt(schema.int()) }),
    run: (args) => ({ text: args.text.repeat(args.times ?? 1) }),
  });
  monitor.register({
    name: 'test-fail',
    run: () => {
      throw new QmpError('DeviceNotFound', 'no such thing');
    },
  });
  monitor.register({
    name: 'test-slow',
    run: async () => {
      await new Promise((r) => setTimeout(r, 50));
      return { slow: true };
    },
  });
  await monitor.listen(ours());
  qsd = spawn('qemu-storage-daemon', monitorArgs(theirs()), {
    stdio: 'ignore',
  });
  await waitForSocket(theirs());
});

afterAll(async () => {
  await monitor.close();
  qsd.kill();
  rmSync(dir, { recursive: true, force: true });
});

/** The shape of a QMP message: its keys, error class, and the types of return values. */
function shape(message: Record<string, unknown>): unknown {
  if ('error' in message)
    return { error: (message.error as { class: string }).class, id: message.id };
  if ('return' in message) {
    const r = message.return;
    return { return: Array.isArray(r) ? 'array' : typeof r, id: message.id };
  }
  return Object.keys(message).sort();
}

describe('QMP monitor', () => {
  it('answers the same requests as qemu-storage-daemon with the same shapes and error classes', async () => {
    const requests: (Record<string, unknown> | string)[] = [
      { execute: 'query-version', id: 'early' },
      { execute: 'qmp_capabilities', arguments: { enable: ['bogus'] } },
      { execute: 'qmp_capabilities', id: 1 },
      { execute: 'qmp_capabilities', id: 2 },
      { execute: 'no-such-command', id: 'x' },
      { execute: 'query-version', id: { nested: [1, 2] } },
      { execute: 'query-commands' },
      { foo: 1 },
      { arguments: {} },
      { execute: 42 },
      { execute: 'query-version', arguments: [] },
      { execute: 'query-version', arguments: { extra: 1 } },
      'garbage\n',
      '[1, 2]\n',
      '{"execute":\n "query-version",\n "id": "multi-line"}\n',
      '{"execute":"query-version","id":"a"}{"execute":"query-version","id":"b"}\n',
    ];
    const a = await QmpTestClient.connect(ours());
    const b = await QmpTestClient.connect(theirs());
    try {
      expect(Object.keys(a.greeting)).toEqual(Object.keys(b.greeting));
      const greeting = (m: Record<string, unknown>) =>
        m.QMP as { version: { qemu: object; package: string }; capabilities: unknown };
      expect(Object.keys(greeting(a.greeting).version.qemu).sort()).toEqual(
        Object.keys(greeting(b.greeting).version.qemu).sort(),
      );
      expect(Array.isArray(greeting(a.greeting).capabilities)).toBe(true);
      for (const request of requests) {
        const mine = await a.client.execute(request);
        const reference = await b.client.execute(request);
        expect(shape(mine), JSON.stringify(request)).toEqual(shape(reference));
      }
      // The second of two texts on one line.
      expect(shape(await a.client.next())).toEqual(shape(await b.client.next()));
    } finally {
      a.client.close();
      b.client.close();
    }
  });

  it('offers oob and answers exec-oob as qemu-storage-daemon does, word for word', async () => {
    const sequences: Record<string, unknown>[][] = [
      // oob enabled: no command runs out of band; the members are checked as QEMU does.
      [
        { 'exec-oob': 'query-version' },
        { execute: 'qmp_capabilities', arguments: { enable: ['oob'] } },
        { 'exec-oob': 'query-version', id: 1 },
        { 'exec-oob': 'nope', id: 2 },
        { 'exec-oob': 'query-version', execute: 'query-version', id: 3 },
        { 'exec-oob': 7, id: 4 },
        { execute: 'qmp_capabilities', arguments: { enable: ['oob'] } },
      ],
      // oob not enabled: exec-oob is an unexpected member.
      [{ execute: 'qmp_capabilities' }, { 'exec-oob': 'query-version', id: 1 }],
    ];
    for (const requests of sequences) {
      const a = await QmpTestClient.connect(ours());
      const b = await QmpTestClient.connect(theirs());
      try {
        expect((a.greeting.QMP as { capabilities: unknown }).capabilities).toEqual(
          (b.greeting.QMP as { capabilities: unknown }).capabilities,
        );
        for (const request of requests) {
          const mine = await a.client.execute(request);
          expect(mine, JSON.stringify(request)).toEqual(await b.client.execute(request));
        }
      } finally {
        a.client.close();
        b.client.close();
      }
    }
  });

  it('checks arguments, runs commands in order and answers errors with their class', async () => {
    const { client } = await QmpTestClient.connect(ours());
    try {
      await client.execute({ execute: 'qmp_capabilities' });
      expect(
        await client.execute({ execute: 'test-echo', arguments: { text: 'ab', times: 2 }, id: 7 }),
      ).toEqual({
        return: { text: 'abab' },
        id: 7,
      });
      expect(await client.execute({ execute: 'test-echo', arguments: {} })).toEqual({
        error: { class: 'GenericError', desc: "Parameter 'text' is missing" },
      });
      expect(await client.execute({ execute: 'test-echo', arguments: { text: 1 } })).toEqual({
        error: {
          class: 'GenericError',
          desc: "Invalid parameter type for 'text', expected: string",
        },
      });
      expect(await client.execute({ execute: 'test-fail' })).toEqual({
        error: { class: 'DeviceNotFound', desc: 'no such thing' },
      });
      client.sendRaw(
        '{"execute":"test-slow","id":1}\n{"execute":"test-echo","arguments":{"text":"x"},"id":2}\n',
      );
      expect(await client.next()).toEqual({ return: { slow: true }, id: 1 });
      expect(await client.next()).toEqual({ return: { text: 'x' }, id: 2 });
      const commands = (await client.execute({ execute: 'query-commands' })).return as {
        name: string;
      }[];
      expect(commands.map((c) => c.name)).toEqual(
        expect.arrayContaining(['qmp_capabilities', 'query-version', 'test-echo']),
      );
    } finally {
      client.close();
    }
  });

  it('sends events with timestamps only to negotiated connections', async () => {
    const early = await QmpTestClient.connect(ours());
    const ready = await QmpTestClient.connect(ours());
    try {
      await ready.client.execute({ execute: 'qmp_capabilities' });
      monitor.emitEvent('TEST_EVENT', { n: 1 });
      const event = await ready.client.next();
      expect(event).toMatchObject({ event: 'TEST_EVENT', data: { n: 1 } });
      const ts = event.timestamp as { seconds: number; microseconds: number };
      expect(Math.abs(ts.seconds - Date.now() / 1000)).toBeLessThan(60);
      expect(ts.microseconds).toBeGreaterThanOrEqual(0);
      expect(ts.microseconds).toBeLessThan(1_000_000);
      await early.client.execute({ execute: 'qmp_capabilities' });
      expect(await early.client.execute({ execute: 'query-version' })).toHaveProperty('return');
    } finally {
      early.client.close();
      ready.client.close();
    }
  });

  it('keeps serving after a client sends an oversized text and hangs up', async () => {
    const { client } = await QmpTestClient.connect(ours());
    client.sendRaw(`{"execute":"test-echo","arguments":{"text":"${'x'.repeat(2 << 20)}`);
    client.close();
    const again = await QmpTestClient.connect(ours());
    try {
      expect(await again.client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
    } finally {
      again.client.close();
    }
    expect(statSync(ours()).mode & 0o777).toBe(0o600);
  });
});
