// `vm-disk map`, as `qemu-img map`: the allocation of an image through its backing chain,
// entry by entry as qemu-img's img_map builds them (one block status at a time, merged
// with the entry before when nothing but the length differs and the host offsets follow
// on), with the host offset where the data is in its file; the human output is
// qemu-img's table of where the data is (Offset, Length, Mapped to, File).
import { type BlockBackend, type BlockGraph, hostOffset, schema } from '@vmdisk/block-graph';
import { ImageCommandError } from '../errors.ts';
import { imageArgs } from './args.ts';
import { type Layer, layersOf } from './chain.ts';
import { fullBackingName } from './info.ts';
import { imageGraph, openImage } from './open.ts';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

interface Entry extends MapEntry {
  /** The file the data is in (human output), as qemu-img names it. */
  filename?: string | undefined;
}

/** qemu-img's entry_mergeable: the same in all but the length, host offsets following on. */
function mergeable(a: Entry, b: Entry): boolean {
  if (a.length === 0) return false;
  if (
    a.zero !== b.zero ||
    a.data !== b.data ||
    a.depth !== b.depth ||
    a.present !== b.present ||
    a.filename !== b.filename ||
    (a.offset === undefined) !== (b.offset === undefined)
  )
    return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/** qemu-img's get_block_status: the entry at `offset` (at most `n` bytes). */
async function entryAt(
  graph: BlockGraph,
  backend: BlockBackend,
  layers: readonly Layer[],
  names: readonly string[],
  offset: number,
  n: number,
): Promise<Entry> {
  const [e] = await backend.blockStatus(offset, n);
  const depth = e!.depth ?? 1;
  let length = Math.min(e!.length, n);
  const layer = depth === 0 ? layers.length - 1 : depth - 1;
  // Unallocated throughout, the last layer still tells where its cluster is (qcow2's
  // unallocated subclusters of an allocated cluster), as QEMU's last block status does.
  const m = await hostOffset(graph, layers[layer]!.nodeName, offset, length);
  length = m.length;
  const host = m.offset;
  // A data cluster is data even over a hole in its file (QEMU does not look below it).
  const data = !e!.hole;
  return {
    start: offset,
    length,
    depth: layer,
    present: depth !== 0,
    zero: data ? false : e!.zero,
    data,
    ...(host !== undefined && { offset: host, filename: names[layer] }),
  };
}

/** The entries of the image `backend` reads (node layer0 of `graph`) from start to end. */
async function* entries(
  graph: BlockGraph,
  backend: BlockBackend,
  names: readonly string[],
  start: number,
  end: number,
): AsyncGenerator<[Entry, Entry | undefined]> {
  const layers = layersOf(graph, 'layer0');
  let curr: Entry | undefined;
  for (let offset = start; offset < end; ) {
    const next = await entryAt(graph, backend, layers, names, offset, end - offset);
    offset += next.length;
    if (curr && mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr) yield [curr, next];
    curr = next;
  }
  if (curr) yield [curr, undefined];
}

/** The names qemu-img gives the layers' files: the image's, then each backing file's. */
function layerNames(path: string, layers: readonly Layer[]): string[] {
  const names = [path];
  for (let i = 1; i < layers.length; i++) {
    const above = layers[i - 1]!;
    names.push(
      above.backingName !== undefined
        ? fullBackingName(names[i - 1]!, above.backingName)
        : layers[i]!.filename,
    );
  }
  return names;
}

export async function map(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const a = imageArgs('map', argv);
  const offsetArg = (what: string, text: string | undefined): number | undefined => {
    if (text === undefined) return undefined;
    const n = schema.parseSize(text);
    if (n === undefined) throw new ImageCommandError(`Invalid ${what} specified`);
    return n;
  };
  const startOffset = offsetArg('start offset', a.startOffset) ?? 0;
  const maxLength = offsetArg('max length', a.maxLength);
  const graph = await imageGraph(a.objects);
  try {
    const backend = await openImage(
      graph,
      {
        name: a.path,
        format: a.format,
        imageOpts: a.imageOpts,
        readOnly: true,
        forceShare: a.forceShare,
      },
      'layer0',
    );
    const size = backend.size();
    const end = maxLength !== undefined ? Math.min(size, startOffset + maxLength) : size;
    const layers = layersOf(graph, 'layer0');
    const names = layerNames(a.imageOpts ? layers[0]!.filename : a.path, layers);
    const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);
    if (a.json) {
      const lines: string[] = [];
      for await (const [e] of entries(graph, backend, names, startOffset, end)) {
        const { filename: _f, ...entry } = e;
        lines.push(
          `{ "start": ${entry.start}, "length": ${entry.length}, "depth": ${entry.depth}, "present": ${entry.present}, "zero": ${entry.zero}, "data": ${entry.data}${entry.offset !== undefined ? `, "offset": ${entry.offset}` : ''}}`,
        );
      }
      out.write(`[${lines.join(',\n')}]\n`);
      return 0;
    }
    out.write(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
    for await (const [e, next] of entries(graph, backend, names, startOffset, end)) {
      if (e.data && e.offset === undefined)
        throw new ImageCommandError('File contains external, encrypted or compressed clusters.');
      if (e.data && !e.zero)
        out.write(`${hex(e.start)}${hex(e.length)}${hex(e.offset ?? 0)}${e.filename ?? ''}\n`);
      // As qemu-img: this table does not tell zeros from holes, so they merge.
      if (next && (!next.data || next.zero)) {
        next.data = false;
        next.zero = true;
      }
    }
    return 0;
  } finally {
    await graph.close();
  }
}
