// The checks of the block-dirty-bitmap-* operations that QMP alone cannot reach in
// qemu-storage-daemon 7.2 (busy, read-only and inconsistent bitmaps), and merge's
// all-or-nothing: the words are QEMU's (bdrv_dirty_bitmap_check).
import { describe, expect, it } from 'vitest';
import {
  BlockGraph,
  blockDirtyBitmapAdd,
  blockDirtyBitmapClear,
  blockDirtyBitmapEnable,
  blockDirtyBitmapMerge,
  blockDirtyBitmapRemove,
  lookupDirtyBitmap,
} from '../src/index.ts';

async function graph(): Promise<BlockGraph> {
  const g = new BlockGraph();
  await g.add({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
  await g.add({ driver: 'null-co', 'node-name': 'm', size: 2 << 20 });
  return g;
}

describe('block-dirty-bitmap-* checks', () => {
  it('refuse a busy bitmap but for enable/disable of a read-only one', async () => {
    const g = await graph();
    const busy = blockDirtyBitmapAdd(g, { node: 'n', name: 'busy' });
    busy.busy = true;
    const inUse = "Bitmap 'busy' is currently in use by another operation and cannot be used";
    expect(() => blockDirtyBitmapClear(g, 'n', 'busy')).toThrow(inUse);
    expect(() => blockDirtyBitmapEnable(g, 'n', 'busy', false)).toThrow(inUse);
    await expect(blockDirtyBitmapRemove(g, 'n', 'busy')).rejects.toThrow(inUse);
    expect(() => blockDirtyBitmapMerge(g, 'n', 'busy', [])).toThrow(inUse);
    const ro = blockDirtyBitmapAdd(g, { node: 'n', name: 'ro' });
    ro.readOnly = true;
    const readonly = "Bitmap 'ro' is readonly and cannot be modified";
    expect(() => blockDirtyBitmapClear(g, 'n', 'ro')).toThrow(readonly);
    await expect(blockDirtyBitmapRemove(g, 'n', 'ro')).rejects.toThrow(readonly);
    blockDirtyBitmapEnable(g, 'n', 'ro', false);
    expect(ro.enabled).toBe(false);
    // A busy source may be read (merged from).
    blockDirtyBitmapAdd(g, { node: 'n', name: 'to' });
    blockDirtyBitmapMerge(g, 'n', 'to', ['busy']);
    await g.close();
  }, 10_000);

  it('an inconsistent bitmap can only be removed, and is listed as such', async () => {
    const g = await graph();
    const bad = blockDirtyBitmapAdd(g, { node: 'n', name: 'bad' });
    blockDirtyBitmapAdd(g, { node: 'n', name: 'ok' });
    bad.inconsistent = true;
    const msg = "Bitmap 'bad' is inconsistent and cannot be used";
    expect(() => blockDirtyBitmapClear(g, 'n', 'bad')).toThrow(msg);
    expect(() => blockDirtyBitmapEnable(g, 'n', 'bad', true)).toThrow(msg);
    expect(() => blockDirtyBitmapMerge(g, 'n', 'ok', ['bad'])).toThrow(msg);
    expect(g.query().find((n) => n['node-name'] === 'n')!['dirty-bitmaps']).toEqual([
      { name: 'ok', count: 0, granularity: 65536, recording: true, busy: false, persistent: false },
      {
        name: 'bad',
        count: 0,
        granularity: 65536,
        recording: true,
        busy: false,
        persistent: false,
        inconsistent: true,
      },
    ]);
    await blockDirtyBitmapRemove(g, 'n', 'bad');
    expect(() => lookupDirtyBitmap(g, 'n', 'bad')).toThrow("Dirty bitmap 'bad' not found");
    await g.close();
  }, 10_000);

  it('merge changes the target only when every source merged', async () => {
    const g = await graph();
    const a = blockDirtyBitmapAdd(g, { node: 'n', name: 'a', granularity: 4096 });
    const b = blockDirtyBitmapAdd(g, { node: 'n', name: 'b' });
    blockDirtyBitmapAdd(g, { node: 'm', name: 'other' });
    b.set(0, 1);
    expect(() => blockDirtyBitmapMerge(g, 'n', 'a', ['b', { node: 'm', name: 'other' }])).toThrow(
      "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152) and can't be merged",
    );
    expect(a.count()).toBe(0);
    blockDirtyBitmapMerge(g, 'n', 'a', ['b']);
    // A 64 KiB granule of b covers sixteen 4 KiB granules of a.
    expect(a.count()).toBe(65536);
    await g.close();
  }, 10_000);
});
