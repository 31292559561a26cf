// The backing chain as block jobs and snapshots see it: the layers below a node, finding a
// base by backing file name or node name, and the file name QEMU writes into a header for
// a layer (bs->filename: the file below the format).
import type { BdrvChild, ChildNode } from '../driver.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';

/** The node and every backing layer below it, top first. */
export function chainOf(node: ChildNode): ChildNode[] {
  const out: ChildNode[] = [node];
  for (let b: BdrvChild | undefined = node.backing; b; b = b.node.backing) out.push(b.node);
  return out;
}

/** The file name of a layer: its own, or the one of the storage below it (primary child). */
export function layerFilename(node: ChildNode): string | undefined {
  for (let n: ChildNode | undefined = node; n; n = n.primary?.node) {
    if (n.filename !== undefined) return n.filename;
  }
  return undefined;
}

/** The backing file name a layer's header gives (qcow2's backing-filename), if any. */
function headerName(graph: BlockGraph, node: ChildNode): string | undefined {
  const info = graph.query().find((i) => i['node-name'] === node.name);
  const name = info?.['backing-filename'];
  return typeof name === 'string' ? name : undefined;
}

/**
 * The layer below `top` that `base` (a backing file name, QEMU bdrv_find_backing_image: as
 * the header names it or the file's name) or `baseNode` (a node name) designates.
 */
export function findBase(
  graph: BlockGraph,
  top: ChildNode,
  base: string | undefined,
  baseNode: string | undefined,
): ChildNode | undefined {
  if (base !== undefined && baseNode !== undefined) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      "'base' and 'base-node' cannot be specified at the same time",
    );
  }
  const chain = chainOf(top);
  if (base !== undefined) {
    for (let i = 1; i < chain.length; i++) {
      const layer = chain[i]!;
      if (layerFilename(layer) === base || headerName(graph, chain[i - 1]!) === base) {
        return layer;
      }
    }
    throw new BlockError(BlockErrorCode.BAD_JOB, `Can't find '${base}' in the backing chain`);
  }
  if (baseNode !== undefined) {
    if (!graph.hasNode(baseNode)) {
      throw new BlockError(
        BlockErrorCode.NODE_NOT_FOUND,
        `Cannot find device='' nor node-name='${baseNode}'`,
      );
    }
    const found = chain.slice(1).find((n) => n.name === baseNode);
    if (!found) {
      throw new BlockError(
        BlockErrorCode.BAD_JOB,
        `Node '${baseNode}' is not a backing image of '${top.name}'`,
      );
    }
    return found;
  }
  return undefined;
}
