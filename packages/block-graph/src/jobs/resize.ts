// block_resize (QEMU's qmp_block_resize): the size of a node changes, drained, through a
// backend holding 'resize' (so that a parent that does not share it refuses). A format
// with its own metadata resizes itself (qcow2); raw and filters pass it to their child;
// a protocol node truncates its storage. Exports see the new size on new connections.
import type { ChildNode } from '../driver.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { checkNotBusy } from './op-blockers.ts';

/** The node a QMP `device` or `node-name` names (QEMU bdrv_lookup_bs; no devices here). */
export function lookupNode(graph: BlockGraph, device?: string, nodeName?: string): ChildNode {
  const name = nodeName ?? device;
  if (name === undefined || !graph.hasNode(name)) {
    throw new BlockError(
      BlockErrorCode.NODE_NOT_FOUND,
      `Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`,
    );
  }
  return graph.node(name);
}

/** Sets a node's size, drained (the caller holds the graph's write lock and 'resize'). */
export async function resizeNode(node: BlockNode, size: number): Promise<void> {
  await resizeLayer(node, size);
  node.truncateDirtyBitmaps(node.size());
}

async function resizeLayer(node: BlockNode, size: number): Promise<void> {
  const inst = node.instance;
  if (inst.kind === 'format' && inst.truncate) return inst.truncate(size);
  if (inst.kind === 'filter') return resizeNode(inst.child.node as BlockNode, size);
  if (inst.kind === 'format') {
    const primary = node.primary;
    if (primary?.roles.includes('filtered')) return resizeNode(primary.node, size);
    throw new BlockError(
      BlockErrorCode.NOT_SUPPORTED,
      `Node '${node.name}' of driver '${node.driver}' cannot be resized`,
    );
  }
  return node.truncate(size);
}

export interface BlockResizeOptions {
  device?: string;
  nodeName?: string;
  size: number;
}

export async function blockResize(graph: BlockGraph, o: BlockResizeOptions): Promise<void> {
  const node = lookupNode(graph, o.device, o.nodeName) as BlockNode;
  if (o.size < 0) {
    throw new BlockError(BlockErrorCode.BAD_OPTION, "Parameter 'size' expects a >0 size");
  }
  // Blocked by a job, or as a backing node (QEMU's backing blocker): QEMU's words
  // (QERR_DEVICE_IN_USE with the device argument, NULL without it).
  let blocked = [...node.parents].some((e) => !e.parent.isBackend && e.name === 'backing');
  try {
    checkNotBusy(graph, node.name);
  } catch {
    blocked = true;
  }
  if (blocked) {
    throw new BlockError(BlockErrorCode.NODE_BUSY, `Device '${o.device ?? '(null)'}' is in use`);
  }
  const backend = await graph.createBackend(node.name, {
    name: 'block_resize',
    perm: ['resize'],
    shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
  });
  try {
    await graph.lock.write(() => resizeNode(node, o.size));
  } finally {
    await backend.close();
  }
}
