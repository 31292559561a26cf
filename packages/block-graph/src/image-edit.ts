// What qemu-img does to an image's metadata outside block jobs: emptying it (QEMU
// bdrv_make_empty, qemu-img commit) and writing another backing file name into its header
// (bdrv_change_backing_file, qemu-img rebase).
import { BlockError, BlockErrorCode } from './errors.ts';
import type { BlockGraph } from './graph.ts';
import type { BlockNode } from './node.ts';

/**
 * Deallocates everything in the format node `nodeName` and flushes it; false when its
 * driver cannot (QEMU's -ENOTSUP, which qemu-img commit ignores).
 */
export async function makeEmpty(graph: BlockGraph, nodeName: string): Promise<boolean> {
  const node = graph.node(nodeName) as BlockNode;
  const inst = node.instance;
  if (inst.kind !== 'format' || !inst.makeEmpty) return false;
  await graph.drainedBegin();
  try {
    await inst.makeEmpty();
  } finally {
    graph.drainedEnd();
  }
  await node.flush();
  return true;
}

/**
 * Writes `filename` and `format` (null: none) as the backing file of the format node
 * `nodeName` into its header, drained; the graph's backing link is left as it is (the
 * caller reopens the image to read through the new one).
 */
export async function changeBackingFile(
  graph: BlockGraph,
  nodeName: string,
  filename: string | null,
  format: string | null,
): Promise<void> {
  const node = graph.node(nodeName) as BlockNode;
  const inst = node.instance;
  if (inst.kind !== 'format' || !inst.changeBackingFile) {
    throw new BlockError(BlockErrorCode.NOT_SUPPORTED, 'Operation not supported');
  }
  await graph.drainedBegin();
  try {
    await inst.changeBackingFile(filename, format);
  } finally {
    graph.drainedEnd();
  }
  await node.flush();
}
