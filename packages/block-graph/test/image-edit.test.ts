// What qemu-img does to an image outside jobs, through the graph: makeEmpty (qemu-img
// commit's bdrv_make_empty), changeBackingFile (rebase) and hostOffset (map), judged by
// qemu-img map, info and check on qcow2 v2 and v3 overlays.
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockGraph, changeBackingFile, hostOffset, makeEmpty } from '../src/index.ts';
import { must, tempDir } from './qemu-tools.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

async function overlay(name: string, compat: string): Promise<string> {
  const base = join(dir, `${name}-base.qcow2`);
  const top = join(dir, `${name}.qcow2`);
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
  await must('qemu-io', ['-c', 'write -P 1 0 1M', base]);
  await must('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    `compat=${compat}`,
    '-F',
    'qcow2',
    '-b',
    base,
    top,
  ]);
  await must('qemu-io', ['-c', 'write -P 2 64k 128k', '-c', 'write -z 1M 64k', top]);
  return top;
}

async function opened(path: string): Promise<BlockGraph> {
  const g = new BlockGraph();
  await g.add({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: path } });
  return g;
}

describe('image edits', () => {
  it.each(['0.10', '1.1'])(
    'makeEmpty leaves a compat=%s overlay with nothing of its own',
    async (compat) => {
      const top = await overlay(`empty-${compat}`, compat);
      const g = await opened(top);
      expect(await makeEmpty(g, 'top')).toBe(true);
      await g.close();
      const map = JSON.parse(await must('qemu-img', ['map', '--output=json', top]));
      expect(map.every((e: { depth: number }) => e.depth > 0)).toBe(true);
      await must('qemu-img', ['check', top]);
    },
  );

  it('changeBackingFile writes the name and format qemu-img then reads', async () => {
    const top = await overlay('rename', '1.1');
    const g = await opened(top);
    await changeBackingFile(g, 'top', 'elsewhere.qcow2', 'qcow2');
    await g.close();
    const info = JSON.parse(await must('qemu-img', ['info', '-U', '--output=json', top]));
    expect(info['backing-filename']).toBe('elsewhere.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
  });

  it('hostOffset gives the host offsets qemu-img map gives', async () => {
    const top = await overlay('offsets', '1.1');
    const theirs = JSON.parse(await must('qemu-img', ['map', '--output=json', top]));
    const g = await opened(top);
    for (const e of theirs as { start: number; depth: number; offset?: number }[]) {
      if (e.depth !== 0) continue;
      expect((await hostOffset(g, 'top', e.start, 512)).offset).toBe(e.offset);
    }
    await g.close();
  });
});
