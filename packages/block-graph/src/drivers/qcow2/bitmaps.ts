// The persistent dirty bitmaps of a qcow2 image (QEMU's qcow2-bitmap.c; docs/interop/
// qcow2.txt, "Bitmaps extension"), as the node layer's PersistentBitmapStore (driver.ts):
// which new bitmaps the image can hold.

import type { BdrvDirtyBitmap } from '../../dirty-bitmap.ts';
import type { PersistentBitmapStore } from '../../driver.ts';
import { badOption } from '../../errors.ts';
import type { Qcow2Image } from './image.ts';

/** Limits of the bitmaps extension (QEMU's qcow2-bitmap.c). */
export const BME_MAX_NAME_SIZE = 1023;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
/** Most bytes of bitmap data, and most bitmap table entries, one bitmap may have. */
export const BME_MAX_PHYS_SIZE = 0x20000000;
export const BME_MAX_TABLE_SIZE = 0x8000000;
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;

/** Bytes of a directory entry with that name and extra data (padded to 8). */
export function dirEntrySize(nameBytes: number, extraData = 0): number {
  return Math.ceil((24 + extraData + nameBytes) / 8) * 8;
}

export class Qcow2Bitmaps implements PersistentBitmapStore {
  readonly #image: Qcow2Image;
  /** The bitmaps stored in the image and the size of their directory. */
  #stored = 0;
  #directorySize = 0;

  constructor(image: Qcow2Image) {
    this.#image = image;
  }

  async load(): Promise<BdrvDirtyBitmap[]> {
    return [];
  }

  /** qcow2_co_can_store_new_dirty_bitmap, with its words. */
  canStore(name: string, granularity: number): void {
    const image = this.#image;
    if (image.header.version < 3) throw badOption('Cannot store dirty bitmaps in qcow2 v2 files');
    checkConstraints(image.virtualSize, image.clusterSize, name, granularity);
    if (this.#stored === 0) return;
    if (this.#stored >= QCOW2_MAX_BITMAPS) {
      throw badOption('Maximum number of persistent bitmaps is already reached');
    }
    if (
      this.#directorySize + dirEntrySize(Buffer.byteLength(name)) >
      QCOW2_MAX_BITMAP_DIRECTORY_SIZE
    ) {
      throw badOption('Not enough space in the bitmap directory');
    }
  }

  async remove(_name: string): Promise<void> {}

  async store(_bitmaps: readonly BdrvDirtyBitmap[]): Promise<void> {}
}

/** check_constraints_on_bitmap: granularity, size of its table and data, name length. */
export function checkConstraints(
  size: number,
  clusterSize: number,
  name: string,
  granularity: number,
): void {
  const bits = Math.log2(granularity);
  if (bits > BME_MAX_GRANULARITY_BITS) {
    throw badOption(`Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
  }
  if (bits < BME_MIN_GRANULARITY_BITS) {
    throw badOption(`Granularity is under minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`);
  }
  if (size > BME_MAX_PHYS_SIZE * 2 ** bits || size > BME_MAX_TABLE_SIZE * clusterSize * 2 ** bits) {
    throw badOption('Too much space will be occupied by the bitmap. Use larger granularity');
  }
  if (Buffer.byteLength(name) > BME_MAX_NAME_SIZE) {
    throw badOption(`Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
  }
}
