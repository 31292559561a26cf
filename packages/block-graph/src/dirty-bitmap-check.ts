// What a dirty bitmap may be used for (QEMU's bdrv_dirty_bitmap_check): not while an
// operation holds it (busy), not changed when loaded from a read-only image, not used at
// all when the image says it was left in use (inconsistent: only removing it is allowed).

import type { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import { BlockError, BlockErrorCode } from './errors.ts';

export const BITMAP_BUSY = 1;
export const BITMAP_RO = 2;
export const BITMAP_INCONSISTENT = 4;
/** Changing the bits (clear, merge into it): every check. */
export const BITMAP_DEFAULT = BITMAP_BUSY | BITMAP_RO | BITMAP_INCONSISTENT;
/** Recording on or off: a read-only bitmap may still be enabled or disabled. */
export const BITMAP_ALLOW_RO = BITMAP_BUSY | BITMAP_INCONSISTENT;

/** Throws QEMU's error for the first of the `flags` checks the bitmap fails. */
export function checkDirtyBitmap(bitmap: BdrvDirtyBitmap, flags: number): void {
  const name = bitmap.name ?? '';
  if (flags & BITMAP_BUSY && bitmap.busy) {
    throw new BlockError(
      BlockErrorCode.BITMAP_IN_USE,
      `Bitmap '${name}' is currently in use by another operation and cannot be used`,
      { errnoName: 'EBUSY' },
    );
  }
  if (flags & BITMAP_RO && bitmap.readOnly) {
    throw new BlockError(
      BlockErrorCode.BITMAP_IN_USE,
      `Bitmap '${name}' is readonly and cannot be modified`,
      { errnoName: 'EPERM' },
    );
  }
  if (flags & BITMAP_INCONSISTENT && bitmap.inconsistent) {
    throw new BlockError(
      BlockErrorCode.BITMAP_IN_USE,
      `Bitmap '${name}' is inconsistent and cannot be used`,
    );
  }
}

/**
 * bdrv_merge_dirty_bitmap: sets in `dest` every bit of `src`, both of the same size; dest
 * must be changeable, src consistent. Nothing changes on error.
 */
export function mergeDirtyBitmap(dest: BdrvDirtyBitmap, src: BdrvDirtyBitmap): void {
  checkDirtyBitmap(dest, BITMAP_DEFAULT);
  checkDirtyBitmap(src, BITMAP_INCONSISTENT);
  if (src.size !== dest.size) {
    throw new BlockError(
      BlockErrorCode.BAD_OPTION,
      `Bitmaps are of different sizes (destination size is ${dest.size}, source size is ${src.size}) and can't be merged`,
    );
  }
  dest.merge(src);
}
