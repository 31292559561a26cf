// The dirty bitmaps an NBD export offers (block-export-add `bitmaps`, as QEMU 7.2's
// nbd_export_create): each looked up and checked with QEMU's words, then all of them
// marked busy (so the user cannot clear, remove or change them under a client) until the
// export goes. Each becomes an ExportBitmap of @vmdisk/nbd: meta context
// qemu:dirty-bitmap:NAME, whose block status is the bitmap's dirty areas.

import type { BitmapExtent, ExportBitmap } from '@vmdisk/nbd';
import type { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import { BITMAP_ALLOW_RO, checkDirtyBitmap } from './dirty-bitmap-check.ts';
import { type BlockDirtyBitmapOrStr, lookupDirtyBitmap } from './dirty-bitmap-ops.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import type { BlockGraph } from './graph.ts';
import type { BlockNode } from './node.ts';

/** At most this many extents per reply (QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS: 1 MiB of them). */
const MAX_EXTENTS = (1 << 20) / 8;

export interface ExportedBitmaps {
  /** For the export (NbdServer addExport's dirtyBitmaps), in the order given. */
  readonly bitmaps: ExportBitmap[];
  /** The export is gone: the bitmaps are no longer busy. */
  release(): void;
}

/** A filter's filtered node, or a node's backing node (QEMU's bdrv_filter_or_cow_bs). */
function filterOrCow(node: BlockNode): BlockNode | undefined {
  const edge = node.instance.kind === 'filter' ? node.primary : node.backing;
  return edge?.node as BlockNode | undefined;
}

/**
 * A bitmap's status of [offset, offset + length) (QEMU's bitmap_to_extents): clean and
 * dirty extents alternating from `offset`, the dirty ones as the bitmap's granules make
 * them, cut to the range; cut short after MAX_EXTENTS.
 */
export function bitmapExtents(
  bitmap: BdrvDirtyBitmap,
  offset: number,
  length: number,
): BitmapExtent[] {
  const out: BitmapExtent[] = [];
  const end = offset + length;
  let pos = offset;
  for (;;) {
    const area = bitmap.nextDirtyArea(pos, end);
    if (!area) break;
    if (area.offset > pos) out.push({ length: area.offset - pos, dirty: false });
    out.push({ length: area.length, dirty: true });
    pos = area.offset + area.length;
    if (out.length >= MAX_EXTENTS) return out;
  }
  if (pos < end) out.push({ length: end - pos, dirty: false });
  return out;
}

/**
 * The bitmaps of an export of `nodeName` (`readOnly`: the export is not writable). A name
 * is looked up on the node, then down its filtered and backing nodes; {node, name} on that
 * node. Errors, QEMU's: not found, an enabled bitmap of a writable node in a read-only
 * export, busy, inconsistent. Nothing is marked busy unless all are fine.
 */
export function exportDirtyBitmaps(
  graph: BlockGraph,
  nodeName: string,
  specs: readonly BlockDirtyBitmapOrStr[],
  readOnly: boolean,
): ExportedBitmaps {
  const found: Array<{ name: string; bitmap: BdrvDirtyBitmap }> = [];
  for (const spec of specs) {
    let bitmap: BdrvDirtyBitmap | undefined;
    let name: string;
    if (typeof spec === 'string') {
      name = spec;
      let bs: BlockNode | undefined = graph.node(nodeName) as BlockNode;
      for (; bs; bs = filterOrCow(bs)) {
        bitmap = bs.findDirtyBitmap(name);
        if (bitmap) break;
      }
      if (!bitmap || !bs) {
        throw new BlockError(BlockErrorCode.BITMAP_NOT_FOUND, `Bitmap '${name}' is not found`);
      }
      // Its bits would keep changing under a client that reads a point in time.
      if (readOnly && !bs.readOnly && bitmap.enabled) {
        throw new BlockError(
          BlockErrorCode.BAD_OPTION,
          `Enabled bitmap '${name}' incompatible with readonly export`,
        );
      }
    } else {
      name = spec.name;
      bitmap = lookupDirtyBitmap(graph, spec.node, name).bitmap;
    }
    checkDirtyBitmap(bitmap, BITMAP_ALLOW_RO);
    found.push({ name, bitmap });
  }
  for (const { bitmap } of found) bitmap.busy = true;
  let released = false;
  return {
    bitmaps: found.map(({ name, bitmap }) => ({
      name,
      status: (offset, length) => bitmapExtents(bitmap, offset, length),
    })),
    release() {
      if (released) return;
      released = true;
      for (const { bitmap } of found) bitmap.busy = false;
    },
  };
}
