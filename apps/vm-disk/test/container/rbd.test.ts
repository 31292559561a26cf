// The rbd driver against a real single-node Ceph cluster (harness/ceph.ts), with
// qemu-storage-daemon 7.2's rbd driver (Debian's qemu-block-extra) as the reference:
//  1. an rbd node read and written through an NBD export (qemu-io patterns, nbdinfo --map),
//     and the same image through qsd's rbd driver: same bytes and map, both ways;
//  2. blockdev-create (QMP) and `vm-disk create` / `info` on rbd: names, as QEMU's;
//  3. wrong key, missing pool, missing image: QEMU's words, stable codes; a key-secret is
//     read once at open, so the secret object may be deleted afterwards (as in QEMU);
//  4. a local qcow2 overlay on an RBD base;
//  5. blockdev-mirror from a local qcow2 onto an RBD image and back;
//  6. the OSD killed mid-write: requests fail after the client's timeout, and resume once
//     the OSD is back.
import { NbdClient } from '@vmdisk/nbd';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CephCluster, freePort } from '../harness/ceph.ts';
import {
  CLI,
  monitorArgs,
  type RunningProcess,
  run,
  startQsd,
  useScratch,
  waitFor,
} from '../harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from '../harness/qmp-client.ts';

let ceph: CephCluster;
beforeAll(async () => {
  ceph = await CephCluster.start();
}, 180_000);
afterAll(async () => {
  await ceph?.stop();
});

const scratch = useScratch('vmdisk-rbd-');
type Daemon = 'vm-disk' | 'qsd';

/** The rbd node `r` of `image` in keyval syntax (extra: ",key=value..."). */
const rbdNode = (image: string, extra = ''): string =>
  `driver=rbd,node-name=r,pool=rbd,image=${image},conf=${ceph.conf}${extra}`;

/** `rbd:` name of an image, as qemu-img and vm-disk take it. */
const rbdName = (image: string): string => `rbd:rbd/${image}:conf=${ceph.conf}`;

interface Served {
  uri: string;
  qmp: string;
  process: RunningProcess;
}

/** vm-disk or qsd serving `blockdevs` with the node `exported` as NBD export `r`, and QMP. */
async function serve(
  daemon: Daemon,
  blockdevs: string[],
  exported = 'r',
  extra: string[] = [],
): Promise<Served> {
  const port = await freePort();
  const qmp = scratch.path(`${daemon}-${port}.qmp`);
  const args = [
    ...extra,
    ...blockdevs.flatMap((b) => ['--blockdev', b]),
    '--nbd-server',
    `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
    '--export',
    `type=nbd,id=e,node-name=${exported},name=r,writable=on`,
    ...monitorArgs(qmp),
  ];
  let process: RunningProcess;
  if (daemon === 'vm-disk') process = await scratch.serve(args);
  else {
    process = await startQsd(args, qmp);
    scratch.running.push(process);
  }
  return { uri: `nbd://127.0.0.1:${port}/r`, qmp, process };
}

/** qemu-io commands on a raw NBD export (or rbd: name); fails on any failed command. */
async function qemuIo(target: string, ...commands: string[]): Promise<string> {
  const out = await run('qemu-io', ['-f', 'raw', target, ...commands.flatMap((c) => ['-c', c])]);
  expect(out).not.toMatch(/fail|error/i);
  return out;
}

const map = (uri: string): Promise<string> => run('nbdinfo', ['--map', uri]);

describe('rbd against a Ceph cluster, qemu-storage-daemon 7.2 as the reference', () => {
  it('reads and writes through an NBD export; qsd sees the same bytes, and the reverse', async () => {
    await ceph.rbd('create --size 64M rbd/rw');
    let s = await serve('vm-disk', [rbdNode('rw')]);
    await qemuIo(s.uri, 'write -P 0xa1 0 1M', 'write -P 0xa2 5M 64k', 'write -z 8M 1M', 'flush');
    await qemuIo(s.uri, 'read -P 0xa1 0 1M', 'read -P 0xa2 5M 64k', 'read -P 0 1M 4M');
    const ours = await map(s.uri);
    await s.process.stop();

    s = await serve('qsd', [rbdNode('rw')]);
    await qemuIo(s.uri, 'read -P 0xa1 0 1M', 'read -P 0xa2 5M 64k', 'read -P 0 8M 1M');
    expect(await map(s.uri)).toBe(ours);
    await qemuIo(s.uri, 'write -P 0xb3 10M 128k', 'flush');
    const theirs = await map(s.uri);
    await s.process.stop();

    s = await serve('vm-disk', [rbdNode('rw')]);
    await qemuIo(s.uri, 'read -P 0xb3 10M 128k', 'read -P 0xa1 0 1M');
    expect(await map(s.uri)).toBe(theirs);
    // The allocation is librbd's (fast-diff, whole objects): data up to the end of the
    // object holding 10M, then a hole.
    expect(theirs).toMatch(
      /^\s+0\s+12582912\s+0\s+data\n\s+12582912\s+54525952\s+3\s+hole,zero\n$/,
    );
  });

  it('blockdev-create makes an image as QEMU does; create and info take rbd: names', async () => {
    await ceph.rbd('create --size 1M rbd/placeholder');
    const d = await serve('vm-disk', [rbdNode('placeholder')]);
    const { client } = await QmpTestClient.connect(d.qmp);
    try {
      await client.execute({ execute: 'qmp_capabilities' });
      const reply = await client.execute({
        execute: 'blockdev-create',
        arguments: {
          'job-id': 'c',
          options: {
            driver: 'rbd',
            location: { pool: 'rbd', image: 'made', conf: ceph.conf },
            size: 32 << 20,
            'cluster-size': 1 << 20,
          },
        },
      });
      expect(reply).toEqual({ return: {} });
      await untilEvent(client, (e) => statusIs(e, 'c', 'concluded'));
      const jobs = (await client.execute({ execute: 'query-jobs' })) as {
        return: { id: string; error?: string }[];
      };
      expect(jobs.return.find((j) => j.id === 'c')?.error).toBeUndefined();
    } finally {
      client.close();
    }
    const info = JSON.parse(await ceph.rbd('info --format json rbd/made')) as {
      size: number;
      order: number;
    };
    expect(info).toMatchObject({ size: 32 << 20, order: 20 });

    // vm-disk create / info on rbd: names, as qemu-img's.
    const ours = await run(process.execPath, [
      CLI,
      'create',
      '-f',
      'raw',
      rbdName('cli'),
      '-o',
      'cluster_size=1M',
      '16M',
    ]);
    const theirs = await run('qemu-img', [
      'create',
      '-f',
      'raw',
      rbdName('cli-q'),
      '-o',
      'cluster_size=1M',
      '16M',
    ]);
    expect(ours).toBe(theirs.replace('cli-q', 'cli'));
    for (const json of [[], ['--output=json']]) {
      expect(await run(process.execPath, [CLI, 'info', ...json, rbdName('cli')])).toBe(
        await run('qemu-img', ['info', ...json, rbdName('cli')]),
      );
    }
    // An image that exists: qemu-img's words after the name, and a stable code.
    const again = await runFail(process.execPath, [
      CLI,
      'create',
      '-f',
      'raw',
      rbdName('cli'),
      '1M',
    ]);
    const qemu = await runFail('qemu-img', ['create', '-f', 'raw', rbdName('cli'), '1M']);
    expect(again).toContain(`${rbdName('cli')}: error rbd create: File exists`);
    expect(again).toContain('ERR_VMDISK_BLOCK_RBD_CREATE');
    expect(qemu).toContain(`${rbdName('cli')}: error rbd create: File exists`);
  });

  it('wrong key, missing pool and missing image: QEMU 7.2 words and stable codes', async () => {
    await ceph.rbd('create --size 1M rbd/err');
    const wrongKey = Buffer.alloc(16, 7).toString('base64');
    const cases: { options: QmpMessage; code: string }[] = [
      {
        options: { pool: 'rbd', image: 'nope', conf: ceph.conf },
        code: 'ERR_VMDISK_BLOCK_RBD_IMAGE',
      },
      {
        options: { pool: 'nopool', image: 'err', conf: ceph.conf },
        code: 'ERR_VMDISK_BLOCK_RBD_POOL',
      },
      {
        options: { pool: 'rbd', image: 'err', conf: ceph.conf, 'key-secret': 'k' },
        code: 'ERR_VMDISK_BLOCK_RBD_CONNECT',
      },
    ];
    const secret = ['--object', `secret,id=k,format=base64,data=${wrongKey}`];
    const descs: Record<Daemon, string[]> = { 'vm-disk': [], qsd: [] };
    for (const daemon of ['vm-disk', 'qsd'] as const) {
      await ceph.rbd('create --size 1M rbd/holder-' + daemon);
      const d = await serve(daemon, [rbdNode(`holder-${daemon}`)], 'r', secret);
      const { client } = await QmpTestClient.connect(d.qmp);
      try {
        await client.execute({ execute: 'qmp_capabilities' });
        for (const c of cases) {
          const reply = (await client.execute({
            execute: 'blockdev-add',
            arguments: { driver: 'rbd', 'node-name': 'x', ...c.options },
          })) as { error?: { class: string; desc: string } };
          expect(reply.error?.class).toBe('GenericError');
          descs[daemon].push(reply.error?.desc ?? '');
        }
      } finally {
        client.close();
      }
    }
    expect(descs['vm-disk']).toEqual(descs.qsd);
    expect(descs.qsd).toEqual([
      'error reading header from nope: No such file or directory',
      'error opening pool nopool: No such file or directory',
      expect.stringMatching(/^error connecting: /),
    ]);
    // The codes, as the command line shows them.
    const named = [rbdName('nope'), 'rbd:nopool/err:conf=' + ceph.conf];
    for (const [i, name] of named.entries()) {
      const out = await runFail(process.execPath, [CLI, 'info', name]);
      expect(out).toContain(cases[i]!.code);
    }
  });

  it('key-secret is read once at open: the secret may then be deleted, as in QEMU 7.2', async () => {
    await ceph.rbd('create --size 1M rbd/keyed');
    const key = await ceph.adminKey();
    const replies: Record<Daemon, unknown[]> = { 'vm-disk': [], qsd: [] };
    for (const daemon of ['vm-disk', 'qsd'] as const) {
      const d = await serve(daemon, [rbdNode('keyed', ',key-secret=k')], 'r', [
        '--object',
        `secret,id=k,format=base64,data=${key}`,
      ]);
      const { client } = await QmpTestClient.connect(d.qmp);
      try {
        await client.execute({ execute: 'qmp_capabilities' });
        replies[daemon].push(
          await client.execute({ execute: 'object-del', arguments: { id: 'k' } }),
        );
        // The node keeps working without it.
        await qemuIo(d.uri, `write -P 0x${daemon === 'qsd' ? 'c2' : 'c1'} 0 64k`, 'flush');
        await qemuIo(d.uri, `read -P 0x${daemon === 'qsd' ? 'c2' : 'c1'} 0 64k`);
      } finally {
        client.close();
        await d.process.stop();
      }
    }
    expect(replies['vm-disk']).toEqual(replies.qsd);
    expect(replies.qsd).toEqual([{ return: {} }]);
  });

  it('a local qcow2 overlay on an RBD base', async () => {
    await ceph.rbd('create --size 16M rbd/base');
    await qemuIo(rbdName('base'), 'write -P 0xc1 0 4M');
    const overlay = scratch.path('overlay.qcow2');
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-F',
      'raw',
      '-b',
      rbdName('base'),
      overlay,
    ]);
    const s = await serve(
      'vm-disk',
      [
        rbdNode('base', ',read-only=on'),
        `driver=qcow2,node-name=ov,file.driver=file,file.filename=${overlay},backing=r`,
      ],
      'ov',
    );
    await qemuIo(s.uri, 'read -P 0xc1 0 4M', 'write -P 0xd2 1M 64k', 'read -P 0xd2 1M 64k');
    await qemuIo(s.uri, 'read -P 0xc1 0 1M', 'read -P 0 4M 12M');
    await s.process.stop();
    // The base is untouched; the overlay is a clean qcow2 whose backing qemu-img opens.
    await qemuIo(rbdName('base'), 'read -P 0xc1 0 4M');
    await run('qemu-img', ['check', overlay]);
    await run('qemu-io', ['-c', 'read -P 0xd2 1M 64k', '-c', 'read -P 0xc1 2M 1M', overlay]);
  });

  it('blockdev-mirror from a local qcow2 onto an RBD image and back', async () => {
    const src = scratch.path('src.qcow2');
    const back = scratch.path('back.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '16M']);
    await run('qemu-io', ['-c', 'write -P 0x31 0 2M', '-c', 'write -P 0x32 9M 64k', src]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', back, '16M']);
    await ceph.rbd('create --size 16M rbd/mirror');
    const d = await serve(
      'vm-disk',
      [
        `driver=qcow2,node-name=src,file.driver=file,file.filename=${src}`,
        rbdNode('mirror'),
        `driver=qcow2,node-name=back,file.driver=file,file.filename=${back}`,
      ],
      'back',
    );
    const { client } = await QmpTestClient.connect(d.qmp);
    try {
      await client.execute({ execute: 'qmp_capabilities' });
      for (const [job, device, target] of [
        ['m1', 'src', 'r'],
        ['m2', 'r', 'back'],
      ] as const) {
        expect(
          await client.execute({
            execute: 'blockdev-mirror',
            arguments: { 'job-id': job, device, target, sync: 'full' },
          }),
        ).toEqual({ return: {} });
        await untilEvent(client, (e) => e.event === 'BLOCK_JOB_READY');
        await client.execute({ execute: 'block-job-complete', arguments: { device: job } });
        const done = await untilEvent(client, (e) => e.event === 'BLOCK_JOB_COMPLETED');
        expect((done.data as { error?: string }).error).toBeUndefined();
      }
    } finally {
      client.close();
    }
    await d.process.stop();
    const same = 'Images are identical.\n';
    expect(
      await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', src, rbdName('mirror')]),
    ).toBe(same);
    expect(await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', src, back])).toBe(same);
  });

  it('an OSD killed mid-write fails requests after the client timeout; a restarted one lets I/O resume', async () => {
    await ceph.rbd('create --size 16M rbd/osd');
    // librados's op timeout made short (QEMU's hidden =keyvalue-pairs, as rbd: names set it).
    const node = JSON.stringify({
      driver: 'rbd',
      'node-name': 'r',
      pool: 'rbd',
      image: 'osd',
      conf: ceph.conf,
      cache: { direct: true },
      '=keyvalue-pairs': JSON.stringify(['rados_osd_op_timeout', '3']),
    });
    const s = await serve('vm-disk', [node]);
    const port = Number(new URL(s.uri).port);
    const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'r' });
    try {
      await client.write(0, new Uint8Array(65536).fill(0x41));
      // A writer writes 64 KiB after 64 KiB over 4M-8M until a write fails; the OSD is
      // killed while it runs.
      let written = 0;
      const writer = (async (): Promise<unknown> => {
        const chunk = new Uint8Array(65536).fill(0x42);
        for (let i = 0; ; i++) {
          try {
            await client.write((4 << 20) + (i % 64) * 65536, chunk);
            written++;
          } catch (e) {
            return e;
          }
        }
      })();
      await waitFor('the writer to be writing', () => written >= 10, 60_000);
      await ceph.killOsd();
      expect(await writer).toBeDefined();
      // The server logs what librbd said: the write timed out.
      await waitFor('the timeout in the log', () => s.process.stderr().includes('rbd_aio_write'));
      expect(s.process.stderr()).toMatch(/rbd_aio_write on rbd\/osd failed: Connection timed out/);
      await ceph.restartOsd();
      // Up in the map is not yet peered: a write may still time out (3 s) while the PGs
      // peer. I/O resumes once they have: the first write that succeeds shows it.
      const resumed = new Uint8Array(65536).fill(0x43);
      const deadline = Date.now() + 100_000;
      for (;;) {
        try {
          await client.write(2 << 20, resumed);
          break;
        } catch (e) {
          if (Date.now() > deadline) throw e;
        }
      }
      await client.flush();
      expect((await client.read(0, 65536)).every((b) => b === 0x41)).toBe(true);
      expect((await client.read(2 << 20, 65536)).every((b) => b === 0x43)).toBe(true);
    } finally {
      await client.close();
    }
  }, 150_000);
});

/** Runs a command that must fail; resolves with its message. */
async function runFail(command: string, args: string[]): Promise<string> {
  try {
    await run(command, args);
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`${command} ${args.join(' ')} succeeded`);
}

function statusIs(e: QmpMessage, id: string, status: string): boolean {
  const d = e.data as { id?: string; status?: string } | undefined;
  return e.event === 'JOB_STATUS_CHANGE' && d?.id === id && d?.status === status;
}

/** Reads messages until an event `match` accepts (replies and other events skipped). */
async function untilEvent(
  client: QmpTestClient,
  match: (e: QmpMessage) => boolean,
): Promise<QmpMessage> {
  for (;;) {
    const m = await client.next(60_000);
    if ('event' in m && match(m)) return m;
  }
}
