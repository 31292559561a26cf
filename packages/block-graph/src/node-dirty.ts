// The dirty bitmaps of a node (QEMU's bs->dirty_bitmaps) and the marking the generic write
// layer does for them: every write, write-zeroes and discard that reaches the node sets
// the bits of its enabled bitmaps, whoever sent it (a guest through a backend, a filter
// above, copy-on-read, a block job). Bits are set when the request is done, succeeded or
// not (bdrv_co_write_req_finish): a consumer that reset a range before reading it sees a
// write that lands later as dirty again.

import { BdrvDirtyBitmap, defaultGranularity } from './dirty-bitmap.ts';
import type { WriteFlags, ZeroFlags } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import { NodeWrite } from './node-write.ts';

export abstract class NodeDirty extends NodeWrite {
  /** The node's dirty bitmaps, in creation order. */
  readonly dirtyBitmaps: BdrvDirtyBitmap[] = [];

  /** QEMU bdrv_get_default_bitmap_granularity for this node. */
  defaultBitmapGranularity(): number {
    const cs = this.instance.info?.()['cluster-size'];
    return defaultGranularity(typeof cs === 'number' ? cs : undefined);
  }

  /**
   * A new bitmap on the node (bdrv_create_dirty_bitmap): enabled, clean; `name` must be
   * unique among the node's bitmaps (job bitmaps have none).
   */
  createDirtyBitmap(granularity = this.defaultBitmapGranularity(), name?: string): BdrvDirtyBitmap {
    if (name !== undefined && this.findDirtyBitmap(name)) {
      throw new BlockError(BlockErrorCode.BAD_OPTION, `Bitmap already exists: ${name}`);
    }
    const bitmap = new BdrvDirtyBitmap(this.size(), granularity, name);
    this.dirtyBitmaps.push(bitmap);
    return bitmap;
  }

  /** Drops a bitmap from the node (bdrv_release_dirty_bitmap). */
  releaseDirtyBitmap(bitmap: BdrvDirtyBitmap): void {
    const i = this.dirtyBitmaps.indexOf(bitmap);
    if (i >= 0) this.dirtyBitmaps.splice(i, 1);
  }

  findDirtyBitmap(name: string): BdrvDirtyBitmap | undefined {
    return this.dirtyBitmaps.find((b) => b.name === name);
  }

  /** Marks [offset, +bytes) in every enabled bitmap (bdrv_set_dirty). */
  setDirty(offset: number, bytes: number): void {
    for (const b of this.dirtyBitmaps) if (b.enabled) b.set(offset, bytes);
  }

  /** The node's size changed: every bitmap follows (bdrv_dirty_bitmap_truncate). */
  truncateDirtyBitmaps(size: number): void {
    for (const b of this.dirtyBitmaps) b.truncate(size);
  }

  override write(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
    const p = super.write(offset, buf, flags);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, buf.byteLength);
  }

  override writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    const p = super.writeZeroes(offset, length, flags);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, length);
  }

  override discard(offset: number, length: number): Promise<void> {
    const p = super.discard(offset, length);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, length);
  }

  async #marked(p: Promise<void>, offset: number, length: number): Promise<void> {
    try {
      await p;
    } finally {
      this.setDirty(offset, length);
    }
  }
}
