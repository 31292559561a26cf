// The block-dirty-bitmap-* commands on a graph (QEMU's block/monitor/bitmap-qmp-cmds.c):
// the node and bitmap looked up with QEMU's words, then the node's operation
// (node-dirty.ts) or the bitmap's, checked as QEMU checks it (dirty-bitmap-check.ts).

import { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import {
  BITMAP_ALLOW_RO,
  BITMAP_DEFAULT,
  checkDirtyBitmap,
  mergeDirtyBitmap,
} from './dirty-bitmap-check.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import type { BlockGraph } from './graph.ts';
import type { BlockNode } from './node.ts';
import type { DirtyBitmapAddOptions } from './node-dirty.ts';
import { custom, optionTypeError, str, struct } from './schema.ts';

/** A source of block-dirty-bitmap-merge: a bitmap of the target's node, or of any node. */
export type BlockDirtyBitmapOrStr = string | { node: string; name: string };

/** QEMU's BlockDirtyBitmap: a node and one of its bitmaps. */
const blockDirtyBitmap = struct({ node: str, name: str });

/**
 * BlockDirtyBitmapOrStr's schema (merge sources, an export's bitmaps): a name, or {node,
 * name}. A value of neither type gets QEMU 7.2's words, which name the member 'null' (its
 * alternate visitor has no name for a list element).
 */
export const blockDirtyBitmapOrStr = custom<BlockDirtyBitmapOrStr>(
  'BlockDirtyBitmapOrStr',
  (v, key, syntax) => {
    if (typeof v === 'string') return v;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) {
      throw optionTypeError('null', 'BlockDirtyBitmapOrStr');
    }
    return blockDirtyBitmap.parse(v, key, syntax);
  },
);

/** The node and its bitmap (block_dirty_bitmap_lookup). */
export function lookupDirtyBitmap(
  graph: BlockGraph,
  node: string,
  name: string,
): { node: BlockNode; bitmap: BdrvDirtyBitmap } {
  if (!graph.hasNode(node)) {
    throw new BlockError(BlockErrorCode.NODE_NOT_FOUND, `Node '${node}' not found`);
  }
  const bs = graph.node(node) as BlockNode;
  const bitmap = bs.findDirtyBitmap(name);
  if (!bitmap) {
    throw new BlockError(BlockErrorCode.BITMAP_NOT_FOUND, `Dirty bitmap '${name}' not found`);
  }
  return { node: bs, bitmap };
}

/** block-dirty-bitmap-add. */
export function blockDirtyBitmapAdd(
  graph: BlockGraph,
  o: { node: string; name: string } & DirtyBitmapAddOptions,
): BdrvDirtyBitmap {
  if (o.name === '') {
    throw new BlockError(BlockErrorCode.BAD_OPTION, 'Bitmap name cannot be empty');
  }
  if (!graph.hasNode(o.node)) {
    throw new BlockError(
      BlockErrorCode.NODE_NOT_FOUND,
      `Cannot find device='${o.node}' nor node-name='${o.node}'`,
    );
  }
  return (graph.node(o.node) as BlockNode).addDirtyBitmap(o.name, o);
}

/** block-dirty-bitmap-remove. */
export async function blockDirtyBitmapRemove(
  graph: BlockGraph,
  node: string,
  name: string,
): Promise<void> {
  const found = lookupDirtyBitmap(graph, node, name);
  await found.node.removeDirtyBitmap(found.bitmap);
}

/** block-dirty-bitmap-clear. */
export function blockDirtyBitmapClear(graph: BlockGraph, node: string, name: string): void {
  const { bitmap } = lookupDirtyBitmap(graph, node, name);
  checkDirtyBitmap(bitmap, BITMAP_DEFAULT);
  bitmap.clear();
}

/** block-dirty-bitmap-enable and -disable: recording on or off. */
export function blockDirtyBitmapEnable(
  graph: BlockGraph,
  node: string,
  name: string,
  enabled: boolean,
): void {
  const { bitmap } = lookupDirtyBitmap(graph, node, name);
  checkDirtyBitmap(bitmap, BITMAP_ALLOW_RO);
  bitmap.enabled = enabled;
}

/**
 * block-dirty-bitmap-merge: the sources (bitmaps of `node` by name, or of any node) are
 * merged into a scratch bitmap first, so that the target changes only when all of them
 * could be merged (as QEMU does).
 */
export function blockDirtyBitmapMerge(
  graph: BlockGraph,
  node: string,
  target: string,
  bitmaps: readonly BlockDirtyBitmapOrStr[],
): void {
  const dst = lookupDirtyBitmap(graph, node, target);
  const scratch = new BdrvDirtyBitmap(dst.bitmap.size, dst.bitmap.granularity);
  for (const src of bitmaps) {
    const from =
      typeof src === 'string'
        ? lookupDirtyBitmap(graph, node, src)
        : lookupDirtyBitmap(graph, src.node, src.name);
    mergeDirtyBitmap(scratch, from.bitmap);
  }
  mergeDirtyBitmap(dst.bitmap, scratch);
}
