// Side-by-side runs for block-job tests: the same QMP sequence on qemu-storage-daemon 7.2
// and on vm-disk, compared as a whole (replies and events in order, resulting images).
import { rmSync } from 'node:fs';
import { expect } from 'vitest';
import { run, startQsd, startServe, type useScratch } from './daemon.ts';
import type { QmpMessage } from './qmp-client.ts';
import { bare, monitorArgs, Recorder } from './qmp-recorder.ts';

type Scratch = ReturnType<typeof useScratch>;
export type Daemon = 'qsd' | 'vm-disk';

/** What qemu-img says of an image chain (each layer checked clean) and what it reads as. */
export interface ImageState {
  info: unknown;
  raw: string;
}

export async function imageState(scratch: Scratch, img: string): Promise<ImageState> {
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

/** A base <- mid <- top qcow2 chain: the qemu-io commands that write each layer. */
export interface Chain {
  size: string;
  /** Extra `qemu-img create` arguments for every layer. */
  create?: string[];
  base: string[];
  mid: string[];
  top: string[];
}

/** Creates the chain `c` in scratch as base.qcow2 <- mid.qcow2 <- top.qcow2 (fresh files). */
export async function makeChain(scratch: Scratch, c: Chain): Promise<void> {
  const p = scratch.path.bind(scratch);
  const create = c.create ?? [];
  const write = (cmds: string[], img: string) =>
    run('qemu-io', [...cmds.flatMap((cmd) => ['-c', cmd]), p(img)]);
  for (const f of ['base.qcow2', 'mid.qcow2', 'top.qcow2']) rmSync(p(f), { force: true });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...create, p('base.qcow2'), c.size]);
  await write(c.base, 'base.qcow2');
  for (const [img, below] of [
    ['mid.qcow2', 'base.qcow2'],
    ['top.qcow2', 'mid.qcow2'],
  ] as const) {
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      ...create,
      '-b',
      below,
      '-F',
      'qcow2',
      p(img),
    ]);
  }
  await write(c.mid, 'mid.qcow2');
  await write(c.top, 'top.qcow2');
}

export interface SideBySide {
  /** Makes fresh images before each daemon's run. */
  prepare: () => Promise<void>;
  /** The daemon's arguments besides its QMP monitor. */
  args: (which: Daemon) => string[] | Promise<string[]>;
  scenario: (r: Recorder) => Promise<void>;
  /** The images (scratch names) compared after the runs. */
  results: string[];
  /** How a message is compared (default: without its timestamp). */
  bare?: (m: QmpMessage) => QmpMessage;
  /** Compare the replies only, not the events between them (default: both). */
  repliesOnly?: boolean;
}

/**
 * Runs `scenario` with qemu-storage-daemon, then with vm-disk, each on fresh images; expects
 * the same messages and the same `results` images. Returns what vm-disk's session recorded.
 */
export async function sideBySide(scratch: Scratch, s: SideBySide): Promise<QmpMessage[]> {
  const out: { seen: QmpMessage[]; states: ImageState[] }[] = [];
  for (const which of ['qsd', 'vm-disk'] as const) {
    await s.prepare();
    const qmp = scratch.path(`${which}.qmp`);
    const all = [...monitorArgs(qmp), ...(await s.args(which))];
    const p = which === 'qsd' ? await startQsd(all, qmp) : await startServe(all);
    scratch.running.push(p);
    const r = await Recorder.open(qmp, s.bare ?? bare);
    await s.scenario(r);
    await r.cmd('quit');
    await p.exited;
    r.client.close();
    const states: ImageState[] = [];
    for (const img of s.results) states.push(await imageState(scratch, scratch.path(img)));
    out.push({ seen: r.seen, states });
  }
  const [qsd, ours] = out;
  const compared = (seen: QmpMessage[]) =>
    s.repliesOnly ? seen.filter((m) => !('event' in m)) : seen;
  expect(compared(ours!.seen)).toEqual(compared(qsd!.seen));
  for (const [i, state] of ours!.states.entries()) {
    expect(state.info).toEqual(qsd!.states[i]!.info);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', qsd!.states[i]!.raw, state.raw]);
  }
  return ours!.seen;
}

/** `--blockdev` arguments for the chain base <- mid <- top, `opts` (`k=v,`...) on each qcow2 node. */
export function chainBlockdevs(scratch: Scratch, opts = ''): string[] {
  const layer = (name: string, backing?: string) =>
    `driver=qcow2,node-name=${name},${opts}${backing ? `backing=${backing},` : ''}file.driver=file,file.filename=${scratch.path(`${name}.qcow2`)}`;
  return [
    '--blockdev',
    layer('base'),
    '--blockdev',
    layer('mid', 'base'),
    '--blockdev',
    layer('top', 'mid'),
  ];
}

/**
 * query-named-block-nodes reduced to each node's name, driver and read-only flag (implicit
 * nodes, whose automatic names differ between daemons, as '#'), sorted; recorded so.
 */
export async function nodeGraph(r: Recorder): Promise<void> {
  const m = await r.cmd('query-named-block-nodes');
  const all = m.return as { 'node-name': string; drv: string; ro: boolean }[];
  m.return = all
    .map((n) => ({
      'node-name': n['node-name'].startsWith('#') ? '#' : n['node-name'],
      drv: n.drv,
      ro: n.ro,
    }))
    .sort((a, b) => `${a['node-name']}${a.drv}`.localeCompare(`${b['node-name']}${b.drv}`));
}
