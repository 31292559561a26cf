// Where a format node keeps guest bytes in its file (QEMU's block status "map" and
// OFFSET_VALID): what qemu-img map prints as "offset" / "Mapped to".
import type { BlockGraph } from './graph.ts';
import type { BlockNode } from './node.ts';

/**
 * The host offset of guest byte `offset` of node `nodeName` in the file below it, and how
 * many bytes from there (at most `length`) follow contiguously: a format node's data
 * mapping (also of zero or unallocated (sub)clusters of an allocated qcow2 cluster, as
 * QEMU's; none for compressed data), a protocol node's own offset.
 */
export async function hostOffset(
  graph: BlockGraph,
  nodeName: string,
  offset: number,
  length: number,
): Promise<{ length: number; offset?: number }> {
  const node = graph.node(nodeName) as BlockNode;
  const inst = node.instance;
  if (inst.kind === 'filter') return hostOffset(graph, inst.child.node.name, offset, length);
  if (inst.kind !== 'format') return { length, offset };
  const lock = graph.lock;
  if (!lock.tryRead()) await lock.read();
  try {
    const m = await inst.map(offset, length, 'read');
    const n = Math.min(m.length, length);
    if (m.read || m.offset === undefined) return { length: n };
    return { length: n, offset: m.offset };
  } finally {
    lock.releaseRead();
  }
}
