// The lazily loaded export kinds (vhost-user-blk, FUSE): nothing is loaded until the first
// block-export-add, concurrent adds share one load, a failed load is tried again by the
// next add. (That the real kinds work when first used, from the command line and from
// block-export-add, is shown by vhost-user-blk.test.ts and fuse-export.test.ts.)
import { describe, expect, it } from 'vitest';
import type { BlockExportInfo, BlockExportKind } from '../src/export-kind.ts';
import { LazyExportKind } from '../src/lazy-export-kind.ts';
import type { FuseExportConfig } from '../src/options/serve-options.ts';

/** A kind keeping its exports in a map, as the real kinds do. */
class MapKind implements BlockExportKind<FuseExportConfig> {
  readonly ids = new Set<string>();
  add(config: FuseExportConfig): Promise<void> {
    this.ids.add(config.id);
    return Promise.resolve();
  }
  del(id: string): Promise<void> {
    this.ids.delete(id);
    return Promise.resolve();
  }
  info(id: string): BlockExportInfo | undefined {
    return this.ids.has(id)
      ? { type: 'fuse', id, 'node-name': 'n0', 'shutting-down': false }
      : undefined;
  }
  closeAll(): Promise<void> {
    this.ids.clear();
    return Promise.resolve();
  }
}

const config = (id: string) => ({ id }) as FuseExportConfig;

describe('LazyExportKind', () => {
  it('loads its kind once, on the first add, for concurrent adds', async () => {
    const loaded: MapKind[] = [];
    const lazy = new LazyExportKind(async () => {
      const k = new MapKind();
      loaded.push(k);
      return k;
    });
    await lazy.closeAll();
    expect(lazy.info('e0')).toBeUndefined();
    expect(loaded).toHaveLength(0);
    await Promise.all([lazy.add(config('e0')), lazy.add(config('e1'))]);
    expect(loaded).toHaveLength(1);
    expect(lazy.info('e1')?.id).toBe('e1');
    await lazy.del('e0', 'safe');
    expect([...loaded[0]!.ids]).toEqual(['e1']);
  });

  it('tries a failed load again on the next add', async () => {
    let attempts = 0;
    const lazy = new LazyExportKind(async () => {
      attempts++;
      if (attempts === 1) throw new Error('cannot load');
      return new MapKind();
    });
    await expect(lazy.add(config('e0'))).rejects.toThrow('cannot load');
    await lazy.add(config('e0'));
    expect(attempts).toBe(2);
    expect(lazy.info('e0')?.id).toBe('e0');
  });
});
