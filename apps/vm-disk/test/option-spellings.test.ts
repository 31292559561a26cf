// One option schema, one set of spellings: every path that takes options (--blockdev,
// --export, --object, --monitor on the command line; QMP's arguments) accepts and refuses
// a boolean's spellings alike, and words errors alike, as qemu-storage-daemon 7.2 does.
// Each case runs qemu-storage-daemon itself and compares its message with ours.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '@vmdisk/block-graph';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseServeOptions } from '../src/options/serve-options.ts';
import { type RunningProcess, start, startQsd, startServe } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

let dir: string;
const processes: RunningProcess[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-spellings-'));
  mkdirSync(join(dir, 'psk'));
  writeFileSync(join(dir, 'psk', 'keys.psk'), 'qemu:0123456789abcdef\n');
});

afterAll(async () => {
  await Promise.all(processes.map((p) => p.stop('SIGKILL')));
  rmSync(dir, { recursive: true, force: true });
});

/** qemu-storage-daemon's message for a command line it refuses (without "--OPT VALUE: "). */
async function theirs(args: string[]): Promise<string> {
  const p = start('qemu-storage-daemon', args);
  processes.push(p);
  await p.exited;
  const lines = p.stderr().trim().split('\n');
  return (lines[lines.length - 1] ?? '').replace(/^qemu-storage-daemon: --\S+ \S+: /, '');
}

/**
 * Ours for the same command line: the options checked as `vm-disk serve` checks them, then
 * the --blockdev values added to a graph in order, as the daemon does at start.
 */
async function ours(args: string[]): Promise<string> {
  try {
    const config = parseServeOptions(args);
    const graph = new BlockGraph();
    try {
      for (const b of config.blockdevs) {
        await graph.add(b.options, { syntax: b.syntax, requireNodeName: true });
      }
    } finally {
      await graph.close();
    }
  } catch (e) {
    return e instanceof Error ? e.message.replace(/^--[a-z-]+: /, '') : String(e);
  }
  return 'accepted';
}

// QEMU's qapi_bool_parse(): these, lower case, and nothing else.
const TRUE = ['on', 'yes', 'true', 'y'];
const FALSE = ['off', 'no', 'false', 'n'];
const REFUSED = ['YES', 'On', '1', '0', 'maybe', ''];

/** Command lines using spelling `s` for booleans, and what stops them once `s` is taken. */
function commandLines(s: string): { name: string; args: string[]; key: string; next: string }[] {
  const secret = ['--object', 'secret,id=zz']; // refused by both: proves what came before was taken
  const taken = "Either 'file' or 'data' must be provided";
  return [
    {
      name: '--blockdev',
      args: [
        '--blockdev',
        `driver=null-co,node-name=n,cache.direct=${s},cache.no-flush=${s},read-only=${s},auto-read-only=${s},force-share=${s},read-zeroes=${s}`,
        '--blockdev',
        'driver=nosuch,node-name=z',
      ],
      key: 'cache.direct',
      next: "Parameter 'driver' does not accept value 'nosuch'",
    },
    {
      name: '--export',
      args: [
        '--blockdev',
        'driver=null-co,node-name=n',
        '--nbd-server',
        `addr.type=unix,addr.path=${join(dir, `nbd-${s}.sock`)}`,
        '--export',
        `type=nbd,id=e,node-name=n,writable=${s},allocation-depth=${s}`,
        ...secret,
      ],
      key: 'writable',
      next: taken,
    },
    {
      name: '--object',
      args: [
        '--object',
        `tls-creds-psk,id=t,dir=${join(dir, 'psk')},endpoint=server,verify-peer=${s}`,
        ...secret,
      ],
      key: 'verify-peer',
      next: taken,
    },
    {
      name: '--monitor',
      args: [
        '--chardev',
        `socket,id=c,path=${join(dir, `qmp-${s}.sock`)},server=on,wait=off`,
        '--monitor',
        `c,pretty=${s}`,
        ...secret,
      ],
      key: 'pretty',
      next: taken,
    },
  ];
}

describe('boolean spellings on the command line, as qemu-storage-daemon takes them', () => {
  for (const s of [...TRUE, ...FALSE, ...REFUSED]) {
    it(`'${s}' is ${REFUSED.includes(s) ? 'refused' : 'taken'} by --blockdev, --export, --object and --monitor alike`, async () => {
      for (const { name, args, key, next } of commandLines(s)) {
        const expected = REFUSED.includes(s) ? `Parameter '${key}' expects 'on' or 'off'` : next;
        expect(await theirs(args), `qemu-storage-daemon ${name} ${s}`).toBe(expected);
        expect(await ours(args), `vm-disk serve ${name} ${s}`).toBe(expected);
      }
    });
  }
});

describe('object and size errors in qemu-storage-daemon words', () => {
  it('tls-creds, throttle-group and secret properties', async () => {
    const cases: [string, string][] = [
      [
        'tls-creds-x509,id=t,dir=/nonexistent,endpoint=x',
        "Parameter 'endpoint' does not accept value 'x'",
      ],
      ['tls-creds-psk,id=t,endpoint=server', "Missing 'dir' property value"],
      ['tls-creds-x509,id=t,endpoint=client', "Missing 'dir' property value"],
      ['throttle-group,id=t,x-iops-total=-1', 'Property values cannot be negative'],
      ['throttle-group,id=t,x-iops-total=1k', "Parameter 'x-iops-total' expects integer"],
      ['tls-creds-psk,id=t,dir=/x,endpoint=server,bogus=1', "Parameter 'bogus' is unexpected"],
      ['secret,id=s,data=x,format=hex', "Parameter 'format' does not accept value 'hex'"],
    ];
    for (const [value, message] of cases) {
      const args = ['--object', value];
      expect(await theirs(args), `qemu-storage-daemon --object ${value}`).toBe(message);
      expect(await ours(args), `vm-disk serve --object ${value}`).toBe(message);
    }
  });

  it("a size's keyval error is QEMU's 'expects size'", async () => {
    // qemu-storage-daemon has no size among the options vm-disk shares with it; its words
    // for one are those of any QAPI size member.
    expect(await theirs(['--object', 'memory-backend-ram,id=m,size=1Q'])).toBe(
      "Parameter 'size' expects size",
    );
    const sock = join(dir, 'size.sock');
    expect(
      await ours(['--nbd-server', `addr.type=unix,addr.path=${sock},request-memory-budget=1Q`]),
    ).toBe("Parameter 'request-memory-budget' expects size");
  });
});

describe("QMP's typed arguments: keyval spellings are refused, as qemu-storage-daemon refuses them", () => {
  let oursQmp: QmpTestClient;
  let theirsQmp: QmpTestClient;

  beforeAll(async () => {
    const monitor = (qmp: string) => [
      '--chardev',
      `socket,id=m0,path=${qmp},server=on,wait=off`,
      '--monitor',
      'chardev=m0',
    ];
    const a = join(dir, 'ours.qmp');
    const b = join(dir, 'theirs.qmp');
    processes.push(await startServe(monitor(a)));
    processes.push(await startQsd(monitor(b), b));
    for (const [qmp, set] of [
      [a, (c: QmpTestClient) => (oursQmp = c)],
      [b, (c: QmpTestClient) => (theirsQmp = c)],
    ] as const) {
      const { client } = await QmpTestClient.connect(qmp);
      expect(await client.execute({ execute: 'qmp_capabilities' })).toEqual({ return: {} });
      set(client);
    }
  });

  afterAll(() => {
    oursQmp?.close();
    theirsQmp?.close();
  });

  const invalidType = (key: string, expected: string): QmpMessage => ({
    error: {
      class: 'GenericError',
      desc: `Invalid parameter type for '${key}', expected: ${expected}`,
    },
  });

  it('"on" for a boolean in blockdev-add, block-export-add and object-add', async () => {
    const psk = join(dir, 'psk');
    const cases: [string, Record<string, unknown>, QmpMessage][] = [
      [
        'blockdev-add',
        { driver: 'null-co', 'node-name': 'n', 'read-only': 'on' },
        invalidType('read-only', 'boolean'),
      ],
      [
        'blockdev-add',
        { driver: 'null-co', 'node-name': 'n', 'read-zeroes': 'yes' },
        invalidType('read-zeroes', 'boolean'),
      ],
      [
        'blockdev-add',
        { driver: 'null-co', 'node-name': 'n', cache: { direct: 'off' } },
        invalidType('cache.direct', 'boolean'),
      ],
      [
        'block-export-add',
        { type: 'nbd', id: 'e', 'node-name': 'n', writable: 'on' },
        invalidType('writable', 'boolean'),
      ],
      [
        'object-add',
        { 'qom-type': 'tls-creds-psk', id: 't', dir: psk, 'verify-peer': 'on' },
        invalidType('verify-peer', 'boolean'),
      ],
      [
        'object-add',
        { 'qom-type': 'throttle-group', id: 't', 'x-iops-total': '5' },
        invalidType('x-iops-total', 'integer'),
      ],
      [
        'object-add',
        { 'qom-type': 'tls-creds-x509', id: 't', dir: psk, endpoint: 'x' },
        {
          error: { class: 'GenericError', desc: "Parameter 'endpoint' does not accept value 'x'" },
        },
      ],
    ];
    for (const [execute, args, expected] of cases) {
      const request = { execute, arguments: args };
      expect(await theirsQmp.execute(request), `qsd: ${JSON.stringify(request)}`).toEqual(expected);
      expect(await oursQmp.execute(request), `vm-disk: ${JSON.stringify(request)}`).toEqual(
        expected,
      );
    }
  });
});
