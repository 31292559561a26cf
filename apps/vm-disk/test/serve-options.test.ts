import { describe, expect, it } from 'vitest';
import { BadOptionError } from '../src/errors.ts';
import { parseServeOptions } from '../src/options/serve-options.ts';

const blockdev = [
  '--blockdev',
  'driver=file,node-name=f0,filename=/x.img',
  '--blockdev',
  'driver=raw,node-name=d0,file=f0',
];
const server = ['--nbd-server', 'addr.type=inet,addr.host=127.0.0.1,addr.port=10809'];

function badOption(argv: string[]): BadOptionError {
  try {
    parseServeOptions(argv);
  } catch (e) {
    if (e instanceof BadOptionError) return e;
    throw e;
  }
  throw new Error('no error');
}

describe("vm-disk serve's qemu-storage-daemon options", () => {
  it('takes a qemu-storage-daemon command line unchanged', () => {
    const config = parseServeOptions([
      ...blockdev,
      ...server,
      '--export',
      'type=nbd,id=e0,node-name=d0,name=disk,writable=on,description=my disk',
      '--object',
      'tls-creds-psk,id=tls0,dir=/etc/pki,endpoint=server',
      '--chardev',
      'socket,id=m0,path=/run/qmp.sock,server=on,wait=off',
      '--monitor',
      'chardev=m0',
      '--pidfile',
      '/run/vm-disk.pid',
    ]);
    expect(config.blockdevs).toEqual([
      { options: { driver: 'file', 'node-name': 'f0', filename: '/x.img' }, syntax: 'keyval' },
      { options: { driver: 'raw', 'node-name': 'd0', file: 'f0' }, syntax: 'keyval' },
    ]);
    expect(config.nbdServer).toEqual({ addr: { type: 'inet', host: '127.0.0.1', port: '10809' } });
    expect(config.exports).toEqual([
      {
        type: 'nbd',
        id: 'e0',
        nodeName: 'd0',
        name: 'disk',
        description: 'my disk',
        writable: true,
        allocationDepth: false,
      },
    ]);
    expect(config.objects).toEqual([
      {
        options: { 'qom-type': 'tls-creds-psk', id: 'tls0', dir: '/etc/pki', endpoint: 'server' },
        syntax: 'keyval',
      },
    ]);
    expect(config.monitors).toEqual([
      { chardev: { id: 'm0', path: '/run/qmp.sock', server: true, wait: false }, pretty: false },
    ]);
    expect(config.pidfile).toBe('/run/vm-disk.pid');
  });

  it('takes JSON values and the --option=value form', () => {
    const config = parseServeOptions([
      '--blockdev={"driver":"null-co","node-name":"n0","size":1048576}',
      '--nbd-server={"addr":{"type":"unix","path":"/tmp/nbd.sock"},"max-connections":4}',
      '--export={"type":"nbd","id":"e0","node-name":"n0","writable":false}',
    ]);
    expect(config.blockdevs[0]).toEqual({
      options: { driver: 'null-co', 'node-name': 'n0', size: 1048576 },
      syntax: 'json',
    });
    expect(config.nbdServer).toEqual({
      addr: { type: 'unix', path: '/tmp/nbd.sock' },
      maxConnections: 4,
    });
    expect(config.exports[0]?.writable).toBe(false);
  });

  it('converts keyval strings by the schema (yes/no, y/n, decimal integers)', () => {
    const config = parseServeOptions([
      ...blockdev,
      '--nbd-server',
      'addr.type=unix,addr.path=/s,max-connections=16',
      '--export',
      'type=nbd,id=e0,node-name=d0,writable=yes,allocation-depth=n',
    ]);
    expect(config.nbdServer?.maxConnections).toBe(16);
    expect(config.exports[0]).toMatchObject({ writable: true, allocationDepth: false });
  });

  it('takes request-memory-budget, a vm-disk extension of --nbd-server, as a size', () => {
    for (const value of ['request-memory-budget=512M', 'request-memory-budget=536870912']) {
      const config = parseServeOptions(['--nbd-server', `addr.type=unix,addr.path=/s,${value}`]);
      expect(config.nbdServer?.requestMemoryBudget).toBe(512 * 1024 * 1024);
    }
    expect(() =>
      parseServeOptions(['--nbd-server', 'addr.type=unix,addr.path=/s,request-memory-budget=lots']),
    ).toThrow(/request-memory-budget/);
  });

  it.each([
    [['--bogus', 'x'], '--bogus', 'unknown option'],
    [['stray'], 'stray', 'unexpected argument'],
    [['--blockdev'], '--blockdev', 'requires a value'],
    [['--blockdev', 'driver'], '--blockdev', "Expected '='"],
    [['--blockdev', '{"driver":'], '--blockdev', 'JSON'],
    [['--nbd-server', 'addr.type=tcp'], '--nbd-server', "'type' does not accept value 'tcp'"],
    [['--nbd-server', 'addr.type=inet,addr.host=h'], '--nbd-server', "'addr.port' is missing"],
    [
      ['--nbd-server', 'addr.type=unix,addr.path=/s,max-connections=many'],
      '--nbd-server',
      "Parameter 'max-connections' expects integer",
    ],
    [
      ['--nbd-server', 'addr.type=unix,addr.path=/s,max-connections=-1'],
      '--nbd-server',
      "Parameter 'max-connections' expects uint32_t",
    ],
    [
      ['--nbd-server', 'addr.type=unix,addr.path=/s,addr.host=h'],
      '--nbd-server',
      "Parameter 'addr.host' is unexpected",
    ],
    // JSON on the command line is typed as QMP's arguments (qemu-storage-daemon's words).
    [
      ['--nbd-server', '{"addr":{"type":"unix","path":"/s"},"max-connections":"4"}'],
      '--nbd-server',
      "Parameter 'max-connections' expects uint64",
    ],
    [
      ['--nbd-server', '{"addr":{"type":"inet","host":"127.0.0.1","port":10809}}'],
      '--nbd-server',
      "Invalid parameter type for 'addr.port', expected: string",
    ],
    [
      ['--nbd-server', '{"addr":{"type":"unix"}}'],
      '--nbd-server',
      "Parameter 'addr.path' is missing",
    ],
    [
      [
        ...blockdev,
        ...server,
        '--export',
        '{"type":"nbd","id":"e0","node-name":"d0","writable":"yes"}',
      ],
      '--export',
      "Invalid parameter type for 'writable', expected: boolean",
    ],
    [
      [...blockdev, ...server, '--export', '{"type":"nbd","node-name":"d0"}'],
      '--export',
      "Parameter 'id' is missing",
    ],
    [
      ['--object', '{"qom-type":"tls-creds-x509","id":"t","dir":"/tmp","verify-peer":"no"}'],
      '--object',
      "Invalid parameter type for 'verify-peer', expected: boolean",
    ],
    [
      ['--object', 'tls-creds-x509,id=t,dir=/tmp,verify-peer=maybe'],
      '--object',
      "Parameter 'verify-peer' expects 'on' or 'off'",
    ],
    [
      [...blockdev, ...server, '--export', 'type=nbd,id=e0,node-name=d0,colour=red'],
      '--export',
      "'colour' is unexpected",
    ],
    [
      [...blockdev, ...server, '--export', 'type=nbd,id=e0,node-name=d0,writable=maybe'],
      '--export',
      "'writable' expects 'on' or 'off'",
    ],
    [
      [...blockdev, ...server, '--export', 'type=nbd,id=e0,node-name=nope'],
      '--export',
      "node-name 'nope'",
    ],
    [[...blockdev, '--export', 'type=nbd,id=e0,node-name=d0'], '--export', 'need an --nbd-server'],
    [['--monitor', 'chardev=m9'], '--monitor', "chardev 'm9' not found"],
    [['--chardev', 'socket,id=m0,path=/s', '--monitor', 'chardev=m0'], '--chardev', 'server=on'],
    [
      ['--nbd-server', 'addr.type=unix,addr.path=/s,tls-creds=t0'],
      '--nbd-server',
      "No TLS credentials with id 't0'",
    ],
    [
      ['--object', 'tls-creds-x509,id=a,dir=/d', '--object', 'tls-creds-psk,id=a,dir=/d'],
      '--object',
      "Duplicate ID 'a'",
    ],
  ])('refuses %j, naming %s', (argv, option, message) => {
    const e = badOption(argv);
    expect(e.code).toBe('ERR_VMDISK_APP_BAD_OPTION');
    expect(e.option).toBe(option);
    expect(e.message).toContain(message);
  });
});
