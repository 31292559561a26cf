// `vm-disk map`, as `qemu-img map`: the allocation of an image through its backing chain.
import type { Extent } from '@vmdisk/block-graph';
import { imageArgs } from './args.ts';
import { openForReading, probeFormat } from './open.ts';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

/** The allocation of an image through its whole backing chain, merged as qemu-img map merges it. */
export async function mapImage(path: string, forceShare = false): Promise<MapEntry[]> {
  const format = await probeFormat(path);
  const graph = await openForReading(path, format, forceShare, true);
  try {
    const chainLength = graph.query().filter((n) => n.driver !== 'file').length;
    const backend = await graph.createBackend('image', {
      name: 'map',
      maxExtents: 65536,
      perm: ['consistent-read'],
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
    const size = backend.size();
    const entries: MapEntry[] = [];
    for (let offset = 0; offset < size; ) {
      const extents: Extent[] = await backend.blockStatus(offset, size - offset);
      for (const e of extents) {
        const length = Math.min(e.length, size - offset);
        const depth = e.depth ?? 1;
        const entry: MapEntry = {
          start: offset,
          length,
          depth: depth === 0 ? chainLength - 1 : depth - 1,
          present: depth !== 0,
          zero: e.zero,
          data: !e.hole,
        };
        const last = entries.at(-1);
        if (
          last &&
          last.depth === entry.depth &&
          last.present === entry.present &&
          last.zero === entry.zero &&
          last.data === entry.data
        ) {
          last.length += length;
        } else {
          entries.push(entry);
        }
        offset += length;
        if (offset >= size) break;
      }
    }
    await backend.close();
    return entries;
  } finally {
    await graph.close();
  }
}

export async function map(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { path, json, forceShare } = imageArgs('map', argv);
  const entries = await mapImage(path, forceShare);
  if (json) {
    out.write(`[${entries.map((e) => JSON.stringify(e)).join(',\n')}]\n`);
    return 0;
  }
  out.write(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Depth'.padEnd(8)}Allocation\n`);
  for (const e of entries) {
    const what = !e.present ? 'unallocated' : e.zero ? 'zero' : 'data';
    out.write(
      `${`0x${e.start.toString(16)}`.padEnd(20)}${`0x${e.length.toString(16)}`.padEnd(20)}${String(e.depth).padEnd(8)}${what}\n`,
    );
  }
  return 0;
}
