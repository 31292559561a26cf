// The dirty bitmaps of a node (QEMU's bs->dirty_bitmaps) and the marking the generic write
// layer does for them: every write, write-zeroes and discard that reaches the node sets
// the bits of its enabled bitmaps, whoever sent it (a guest through a backend, a filter
// above, copy-on-read, a block job). Bits are set when the request is done, succeeded or
// not (bdrv_co_write_req_finish): a consumer that reset a range before reading it sees a
// write that lands later as dirty again.
//
// Persistent bitmaps are the driver's to store (driver.ts PersistentBitmapStore): loaded
// after open, stored before close, asked before one is made persistent.

import { BdrvDirtyBitmap, defaultGranularity } from './dirty-bitmap.ts';
import { BITMAP_BUSY, BITMAP_RO, checkDirtyBitmap } from './dirty-bitmap-check.ts';
import type { CopySource, WriteFlags, ZeroFlags } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import { NodeCopy } from './node-copy.ts';

/** QEMU's longest bitmap name (BDRV_BITMAP_MAX_NAME_SIZE). */
export const BITMAP_MAX_NAME_SIZE = 1023;

/** block-dirty-bitmap-add's options besides the node and name. */
export interface DirtyBitmapAddOptions {
  granularity?: number | undefined;
  persistent?: boolean | undefined;
  disabled?: boolean | undefined;
}

export abstract class NodeDirty extends NodeCopy {
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
      throw new BlockError(BlockErrorCode.DUPLICATE_BITMAP, `Bitmap already exists: ${name}`);
    }
    if (name !== undefined && Buffer.byteLength(name) > BITMAP_MAX_NAME_SIZE) {
      throw new BlockError(BlockErrorCode.BAD_OPTION, `Bitmap name too long: ${name}`);
    }
    const bitmap = new BdrvDirtyBitmap(this.size(), granularity, name);
    this.dirtyBitmaps.push(bitmap);
    return bitmap;
  }

  /**
   * block-dirty-bitmap-add once the node is found (qmp_block_dirty_bitmap_add): the
   * granularity checked, a persistent one asked of the driver first, then created.
   */
  addDirtyBitmap(name: string, o: DirtyBitmapAddOptions = {}): BdrvDirtyBitmap {
    const { granularity = this.defaultBitmapGranularity() } = o;
    if (granularity < 512 || (granularity & (granularity - 1)) !== 0) {
      throw new BlockError(
        BlockErrorCode.BAD_OPTION,
        'Granularity must be power of 2 and at least 512',
      );
    }
    if (o.persistent) this.#checkCanStore(name, granularity);
    const bitmap = this.createDirtyBitmap(granularity, name);
    if (o.disabled) bitmap.enabled = false;
    bitmap.persistent = o.persistent ?? false;
    return bitmap;
  }

  /** bdrv_can_store_new_dirty_bitmap: the driver's store decides, with QEMU's words. */
  #checkCanStore(name: string, granularity: number): void {
    const store = this.instance.persistentBitmaps;
    if (!store) {
      throw new BlockError(
        BlockErrorCode.BITMAP_NOT_STORABLE,
        `Can't store persistent bitmaps to ${this.name}: Operation not supported`,
      );
    }
    try {
      store.canStore(name, granularity);
    } catch (e) {
      throw new BlockError(
        BlockErrorCode.BITMAP_NOT_STORABLE,
        `Can't make bitmap '${name}' persistent in '${this.name}': ${(e as Error).message}`,
        { cause: e },
      );
    }
  }

  /**
   * block-dirty-bitmap-remove (block_dirty_bitmap_remove): not while busy or read-only; a
   * persistent bitmap leaves the image too. An inconsistent one may be removed.
   */
  async removeDirtyBitmap(bitmap: BdrvDirtyBitmap): Promise<void> {
    checkDirtyBitmap(bitmap, BITMAP_BUSY | BITMAP_RO);
    if (bitmap.persistent && bitmap.name !== undefined) {
      await this.instance.persistentBitmaps?.remove(bitmap.name);
    }
    this.releaseDirtyBitmap(bitmap);
  }

  /** The image's persistent bitmaps join the node's (after open). */
  async loadPersistentBitmaps(): Promise<void> {
    const store = this.instance.persistentBitmaps;
    if (!store) return;
    for (const b of await store.load()) this.dirtyBitmaps.push(b);
  }

  /** The node's persistent bitmaps go to the image (before close). */
  async storePersistentBitmaps(): Promise<void> {
    const store = this.instance?.persistentBitmaps;
    if (!store) return;
    await store.store(this.dirtyBitmaps.filter((b) => b.persistent));
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

  /**
   * block-set-write-threshold: the first write or write-zeroes (or discard that is not
   * ignored) ending beyond it fires BLOCK_WRITE_THRESHOLD and turns it off; 0 is off
   * (QEMU's bdrv_write_threshold_check_write, checked as the request starts).
   */
  writeThreshold = 0;

  protected abstract writeThresholdExceeded(amountExceeded: number, threshold: number): void;

  #checkThreshold(offset: number, length: number): void {
    const threshold = this.writeThreshold;
    if (threshold === 0 || threshold >= offset + length) return;
    this.writeThreshold = 0;
    this.writeThresholdExceeded(offset + length - threshold, threshold);
  }

  override write(offset: number, buf: Uint8Array, flags?: WriteFlags): Promise<void> {
    if (this.writeThreshold !== 0) this.#checkThreshold(offset, buf.byteLength);
    const p = super.write(offset, buf, flags);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, buf.byteLength);
  }

  override writeCompressed(offset: number, buf: Uint8Array): Promise<void> {
    if (this.writeThreshold !== 0) this.#checkThreshold(offset, buf.byteLength);
    const p = super.writeCompressed(offset, buf);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, buf.byteLength);
  }

  override async copyFrom(offset: number, length: number, src: CopySource): Promise<boolean> {
    if (this.writeThreshold !== 0) this.#checkThreshold(offset, length);
    const p = super.copyFrom(offset, length, src);
    if (this.dirtyBitmaps.length === 0) return p;
    try {
      return await p;
    } finally {
      this.setDirty(offset, length);
    }
  }

  override writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.writeThreshold !== 0) this.#checkThreshold(offset, length);
    const p = super.writeZeroes(offset, length, flags);
    if (this.dirtyBitmaps.length === 0) return p;
    return this.#marked(p, offset, length);
  }

  override discard(offset: number, length: number): Promise<void> {
    if (this.writeThreshold !== 0 && this.settings.discard === 'unmap') {
      this.#checkThreshold(offset, length);
    }
    const p = super.discard(offset, length);
    // A discard the node ignores (discard=ignore) is not a write: QEMU returns before
    // marking (bdrv_co_pdiscard without BDRV_O_UNMAP).
    if (this.dirtyBitmaps.length === 0 || this.settings.discard !== 'unmap') return p;
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
