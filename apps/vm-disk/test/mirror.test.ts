// blockdev-mirror and drive-mirror over QMP, side by side with qemu-storage-daemon 7.2: the
// same QMP sequence on both gives the same replies, events (in order, timestamps aside,
// the implicit mirror_top's generated name aside) and resulting images.
import { rmSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { run, startQsd, startServe, useScratch } from './harness/daemon.ts';
import { type QmpMessage, QmpTestClient } from './harness/qmp-client.ts';

const scratch = useScratch('vmdisk-mirror-');

/** A message as compared: no timestamp, generated node names (#block123) alike. */
const bare = ({ timestamp: _, ...rest }: QmpMessage): QmpMessage =>
  JSON.parse(JSON.stringify(rest).replace(/#block\d+/g, '#blockN')) as QmpMessage;

class Recorder {
  readonly seen: QmpMessage[] = [];
  private constructor(readonly client: QmpTestClient) {}

  static async open(qmp: string): Promise<Recorder> {
    const { client } = await QmpTestClient.connect(qmp);
    await client.execute({ execute: 'qmp_capabilities' });
    return new Recorder(client);
  }

  /** Sends a command; records the events before its reply, and the reply. */
  async cmd(execute: string, args?: Record<string, unknown>): Promise<QmpMessage> {
    this.client.sendRaw(`${JSON.stringify({ execute, ...(args && { arguments: args }) })}\n`);
    for (;;) {
      const m = bare(await this.client.next());
      this.seen.push(m);
      if (!('event' in m)) return m;
    }
  }

  /** Records events until one matches. */
  async until(event: string, status?: string): Promise<void> {
    for (;;) {
      const m = bare(await this.client.next(30_000));
      this.seen.push(m);
      const data = m.data as { status?: string } | undefined;
      if (m.event === event && (status === undefined || data?.status === status)) return;
    }
  }
}

/** src: 4 MiB qcow2 with data at 0-1M and 3M+64k; dst: an empty 4 MiB qcow2. */
async function makeImages(): Promise<void> {
  const p = scratch.path.bind(scratch);
  for (const f of ['src.qcow2', 'dst.qcow2', 'new.qcow2']) rmSync(p(f), { force: true });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '4M']);
  await run('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 64k', p('src.qcow2')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', p('dst.qcow2'), '4M']);
}

const daemonArgs = () => {
  const p = scratch.path.bind(scratch);
  return [
    '--blockdev',
    `driver=file,node-name=sf,filename=${p('src.qcow2')}`,
    '--blockdev',
    'driver=qcow2,node-name=src,file=sf',
    '--blockdev',
    `driver=file,node-name=df,filename=${p('dst.qcow2')}`,
    '--blockdev',
    'driver=qcow2,node-name=dst,file=df',
  ];
};

/** What an image reads as and what qemu-img says of it (check clean). */
async function imageState(img: string): Promise<{ info: unknown; raw: string }> {
  const info = JSON.parse(
    await run('qemu-img', ['info', '--backing-chain', '--output=json', img]),
  ) as Record<string, unknown>[];
  for (const layer of info) {
    await run('qemu-img', ['check', '-f', String(layer.format), String(layer.filename)]);
    delete layer['actual-size'];
    delete layer['dirty-flag'];
  }
  const raw = scratch.path(`state-${Math.random().toString(36).slice(2)}.raw`);
  await run('qemu-img', ['convert', '-O', 'raw', img, raw]);
  return { info, raw };
}

async function sideBySide(scenario: (r: Recorder) => Promise<void>, result: string): Promise<void> {
  const out: { seen: QmpMessage[]; info: unknown; raw: string }[] = [];
  for (const which of ['qsd', 'vm-disk'] as const) {
    await makeImages();
    const qmp = scratch.path(`${which}.qmp`);
    const args = [
      '--chardev',
      `socket,id=m0,path=${qmp},server=on,wait=off`,
      '--monitor',
      'chardev=m0',
      ...daemonArgs(),
    ];
    const p = which === 'qsd' ? await startQsd(args, qmp) : await startServe(args);
    scratch.running.push(p);
    const r = await Recorder.open(qmp);
    await scenario(r);
    await r.cmd('quit');
    await p.exited;
    r.client.close();
    out.push({ seen: r.seen, ...(await imageState(scratch.path(result))) });
  }
  const [qsd, ours] = out;
  expect(ours!.seen).toEqual(qsd!.seen);
  expect(ours!.info).toEqual(qsd!.info);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', qsd!.raw, ours!.raw]);
}

describe('mirror against qemu-storage-daemon 7.2', () => {
  it('blockdev-mirror: errors, ready, busy source, complete pivots; the target after', async () => {
    await sideBySide(async (r) => {
      const m = { 'job-id': 'm', device: 'src', target: 'dst', sync: 'full' };
      await r.cmd('blockdev-mirror', { ...m, target: 'src' });
      await r.cmd('blockdev-mirror', { ...m, target: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, device: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, granularity: 1000 });
      await r.cmd('blockdev-mirror', { ...m, granularity: 256 });
      await r.cmd('blockdev-mirror', { ...m, 'buf-size': -1 });
      await r.cmd('blockdev-mirror', { ...m, sync: 'incremental' });
      await r.cmd('blockdev-mirror', { ...m, sync: 'bitmap' });
      await r.cmd('block-job-complete', { device: 'nope' });
      await r.cmd('blockdev-mirror', { ...m, granularity: 65536, 'buf-size': 1 << 20 });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('query-block-jobs');
      await r.cmd('blockdev-mirror', { ...m, 'job-id': 'm2' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('query-block-jobs');
    }, 'dst.qcow2');
  });

  it('blockdev-mirror sync none, then complete with nothing to copy', async () => {
    await sideBySide(async (r) => {
      // Ready before the reply: there is nothing to copy.
      await r.cmd('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'dst', sync: 'none' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'dst.qcow2');
  });

  it('drive-mirror to a new image, cancelled after ready: the copy is consistent', async () => {
    await sideBySide(async (r) => {
      const target = scratch.path('new.qcow2');
      await r.cmd('drive-mirror', {
        'job-id': 'm',
        device: 'src',
        target,
        sync: 'full',
        format: 'qcow2',
        'copy-mode': 'write-blocking',
      });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('query-block-jobs');
      await r.cmd('block-job-cancel', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'new.qcow2');
  });

  it('blockdev-mirror cancelled before ready, and completed with a named filter', async () => {
    await sideBySide(async (r) => {
      const m = { 'job-id': 'm', device: 'src', target: 'dst', sync: 'full' };
      await r.cmd('blockdev-mirror', { ...m, speed: 1 });
      await r.cmd('block-job-cancel', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
      await r.cmd('blockdev-mirror', { ...m, 'filter-node-name': 'mt' });
      await r.until('BLOCK_JOB_READY');
      await r.cmd('blockdev-mirror', { ...m, 'job-id': 'x', device: 'mt' });
      await r.cmd('block-job-complete', { device: 'm' });
      await r.until('JOB_STATUS_CHANGE', 'null');
    }, 'dst.qcow2');
  });
});
