// block-export-add `bitmaps` side by side with qemu-storage-daemon 7.2: the same QMP (and
// the same refusals), the bitmaps busy while exported, and what libnbd reads of each
// export: the meta contexts nbdinfo lists and `nbdinfo --map=qemu:dirty-bitmap:NAME`, the
// dirty extents of the writes at the bitmap's granularity; and what QEMU's nbd driver
// reads of them with x-dirty-bitmap (qemu-img map).
import { execFile } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { parseServeOptions } from '../src/options/serve-options.ts';
import { run, useScratch } from './harness/daemon.ts';
import type { Recorder } from './harness/qmp-recorder.ts';
import { sideBySide } from './harness/side-by-side.ts';

const scratch = useScratch('vmdisk-nbd-bitmaps-');

async function prepare(): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path('q.qcow2'), '16M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', scratch.path('ro.qcow2'), '16M']);
}

function args(): string[] {
  const p = scratch.path.bind(scratch);
  return [
    '--blockdev',
    `driver=qcow2,node-name=q,file.driver=file,file.filename=${p('q.qcow2')}`,
    '--blockdev',
    `driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename=${p('ro.qcow2')}`,
  ];
}

/** libnbd (nbdsh, the system's python) on export `name`; its output as JSON. */
function nbdsh(script: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    execFile(
      'nbdsh',
      ['-c', script],
      { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } },
      (err, stdout, stderr) =>
        err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(JSON.parse(stdout)),
    );
  });
}

const uri = (name: string) => `nbd+unix:///${name}?socket=${scratch.path('nbd.sock')}`;

/** Writes (offset, length) pairs of 0x5a through export `name`. */
async function write(name: string, writes: Array<[number, number]>): Promise<void> {
  await nbdsh(
    [
      `h.connect_uri(${JSON.stringify(uri(name))})`,
      `for off, n in ${JSON.stringify(writes)}: h.pwrite(b'Z' * n, off)`,
      'h.flush()',
      'print("null")',
    ].join('\n'),
  );
}

/** Records what libnbd sees of export `name`: the contexts listed, and each bitmap's map. */
async function look(r: Recorder, name: string, maps: string[]): Promise<void> {
  const contexts = await nbdsh(
    [
      'import json',
      'h.set_opt_mode(True)',
      `h.connect_uri(${JSON.stringify(uri(name))})`,
      'seen = []',
      'h.opt_list_meta_context(lambda c: seen.append(c))',
      'h.opt_abort()',
      'print(json.dumps(seen))',
    ].join('\n'),
  );
  r.seen.push({ export: name, contexts });
  for (const context of maps) {
    const map = JSON.parse(await run('nbdinfo', [`--map=${context}`, '--json', uri(name)]));
    r.seen.push({ export: name, context, map });
    // QEMU's own client reads it too (x-dirty-bitmap: dirty shows as "data": false).
    const opts = `driver=nbd,server.type=unix,server.path=${scratch.path('nbd.sock')},export=${name},x-dirty-bitmap=${context}`;
    const qemuMap = JSON.parse(
      await run('qemu-img', ['map', '--output=json', '--image-opts', opts]),
    ) as unknown[];
    r.seen.push({ export: name, context, qemuMap });
  }
}

/** The dirty-bitmaps query-named-block-nodes shows for node q. */
async function bitmapsOfQ(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const q = (m.return as Record<string, unknown>[]).find((n) => n['node-name'] === 'q');
  m.return = q?.['dirty-bitmaps'];
}

describe('block-export-add bitmaps as qemu-storage-daemon 7.2', () => {
  it('exports bitmaps as qemu:dirty-bitmap:NAME, busy while exported, with its refusals', async () => {
    const seen = await sideBySide(scratch, {
      prepare,
      args,
      results: [],
      scenario: async (r) => {
        const add = (a: Record<string, unknown>) =>
          r.cmd('block-export-add', { type: 'nbd', ...a });
        const del = async (id: string) => {
          const before = r.seen.length;
          await r.cmd('block-export-del', { id });
          if (!r.seen.slice(before).some((m) => m.event === 'BLOCK_EXPORT_DELETED')) {
            await r.until('BLOCK_EXPORT_DELETED');
          }
        };
        await r.cmd('nbd-server-start', {
          addr: { type: 'unix', data: { path: scratch.path('nbd.sock') } },
        });
        const bitmap = (a: Record<string, unknown>) => r.cmd('block-dirty-bitmap-add', a);
        await bitmap({ node: 'q', name: 'b64k', granularity: 65536 });
        await bitmap({ node: 'q', name: 'b4k', granularity: 4096 });
        await bitmap({ node: 'q', name: 'off', disabled: true });
        await bitmap({ node: 'ro', name: 'r' });

        // Writes through an export without bitmaps, then every way to be refused.
        await add({ id: 'w', 'node-name': 'q', writable: true });
        await write('q', [
          [100000, 5000],
          [1 << 20, 200 * 1024],
          [16 * (1 << 20) - 1000, 1000],
        ]);
        await del('w');
        await add({ id: 'x', 'node-name': 'q', bitmaps: ['nope'] });
        await add({ id: 'x', 'node-name': 'q', bitmaps: ['b64k'] });
        await add({ id: 'x', 'node-name': 'q', bitmaps: [{ node: 'zz', name: 'b64k' }] });
        await add({ id: 'x', 'node-name': 'q', bitmaps: [{ node: 'q', name: 'nope' }] });
        await add({ id: 'x', 'node-name': 'q', bitmaps: [{ node: 'q' }] });
        await add({ id: 'x', 'node-name': 'q', bitmaps: 'b64k' });
        await add({ id: 'x', 'node-name': 'q', bitmaps: [7] });
        await add({ id: 'x', 'node-name': 'ro', bitmaps: ['r'] });
        await del('x');

        // A writable export with two bitmaps; a read-only one with a disabled bitmap.
        await add({ id: 'e', 'node-name': 'q', writable: true, bitmaps: ['b64k', 'b4k'] });
        await add({ id: 'f', 'node-name': 'q', name: 'f', bitmaps: ['off'] });
        await bitmapsOfQ(r);
        await add({ id: 'g', 'node-name': 'q', name: 'g', writable: true, bitmaps: ['b4k'] });
        await r.cmd('block-dirty-bitmap-clear', { node: 'q', name: 'b4k' });
        await r.cmd('block-dirty-bitmap-remove', { node: 'q', name: 'off' });
        await look(r, 'q', ['qemu:dirty-bitmap:b64k', 'qemu:dirty-bitmap:b4k']);
        await look(r, 'f', ['qemu:dirty-bitmap:off']);
        // A write while exported shows at once.
        await write('q', [[8 * (1 << 20) + 512, 100]]);
        await look(r, 'q', ['qemu:dirty-bitmap:b4k']);
        await del('e');
        await del('f');
        await bitmapsOfQ(r);
        await r.cmd('block-dirty-bitmap-clear', { node: 'q', name: 'b4k' });
        await r.cmd('block-dirty-bitmap-remove', { node: 'q', name: 'off' });
        await bitmapsOfQ(r);
      },
    });
    // Besides being qemu-storage-daemon's: exactly the granules the writes touched.
    const b64k = seen.find((m) => m.context === 'qemu:dirty-bitmap:b64k')?.map as Array<{
      offset: number;
      length: number;
      type: number;
    }>;
    const MiB = 1 << 20;
    expect(b64k.map((e) => [e.offset, e.length, e.type])).toEqual([
      [0, 65536, 0],
      [65536, 65536, 1],
      [131072, 917504, 0],
      [MiB, 262144, 1],
      [MiB + 262144, 15 * MiB - 262144 - 65536, 0],
      [16 * MiB - 65536, 65536, 1],
    ]);
  }, 120_000);

  it('takes bitmaps in --export, keyval and JSON', () => {
    const blockdev = [
      '--blockdev',
      'driver=null-co,node-name=n',
      '--nbd-server',
      'addr.type=unix,addr.path=/s',
    ];
    const keyval = parseServeOptions([
      ...blockdev,
      '--export',
      'type=nbd,id=e,node-name=n,bitmaps.0=a,bitmaps.1.node=n,bitmaps.1.name=b',
    ]);
    expect(keyval.exports[0]).toMatchObject({ bitmaps: ['a', { node: 'n', name: 'b' }] });
    const json = parseServeOptions([
      ...blockdev,
      '--export',
      '{"type":"nbd","id":"e","node-name":"n","bitmaps":["a"]}',
    ]);
    expect(json.exports[0]).toMatchObject({ bitmaps: ['a'] });
  });
});
