// QEMU's mirror_top filter (block/mirror.c bdrv_mirror_top): inserted above a mirror's
// source for the job's life, so that every user of the source goes through it. Reads pass
// through; writes go to the source, whose generic write layer marks the job's dirty
// bitmap. In write-blocking mode a write also goes to the target before it completes
// (MirrorTopWrites.active: mirror-run.ts). At the end the filter's parents move to the
// target (pivot) or back to the source, and it goes.
import type { BdrvChild, BlockDriver, FilterInstance, ZeroFlags } from '../driver.ts';
import { BLK_PERM_ALL, BLK_PERM_WRITE, defaultChildPerms } from '../permissions.ts';

/** What the running mirror does with the writes the filter sees (write-blocking mode). */
export interface MirrorTopWrites {
  /**
   * Runs `source` (the write to the source), then, when the job copies actively, the same
   * write to the target through `target`.
   */
  active(
    offset: number,
    length: number,
    source: () => Promise<void>,
    target: (node: BdrvChild['node']) => Promise<void>,
  ): Promise<void>;
}

export class MirrorTopInstance implements FilterInstance {
  readonly kind = 'filter';
  readonly child: BdrvChild;
  /** Set by the job in write-blocking mode. */
  writes: MirrorTopWrites | undefined;

  constructor(child: BdrvChild) {
    this.child = child;
  }

  size(): number {
    return this.child.node.size();
  }

  write(offset: number, buf: Uint8Array): Promise<void> {
    const w = this.writes;
    if (!w) return this.child.node.write(offset, buf);
    return w.active(
      offset,
      buf.byteLength,
      () => this.child.node.write(offset, buf),
      (t) => t.write(offset, buf),
    );
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const w = this.writes;
    if (!w) return this.child.node.writeZeroes(offset, length, flags);
    return w.active(
      offset,
      length,
      () => this.child.node.writeZeroes(offset, length, flags),
      (t) => t.writeZeroes(offset, length, { mayUnmap: !!flags.mayUnmap }),
    );
  }

  discard(offset: number, length: number): Promise<void> {
    const w = this.writes;
    if (!w) return this.child.node.discard(offset, length);
    return w.active(
      offset,
      length,
      () => this.child.node.discard(offset, length),
      (t) => t.discard(offset, length),
    );
  }
}

/** Not a blockdev-add driver: only mirror opens it (BlockGraph.insertFilter). */
export const mirrorTopDriver: BlockDriver = {
  name: 'mirror_top',
  options: {},
  children: [{ key: 'backing', required: true, roles: () => ['filtered', 'primary'] }],
  childPerms(roles, perm, shared, writable) {
    const p = defaultChildPerms(roles, perm, shared, writable);
    // Forwards guest writes to the source, and lets the job use it (bdrv_mirror_top_child_perm).
    return { perm: p.perm | (writable ? BLK_PERM_WRITE : 0), shared: BLK_PERM_ALL };
  },
  async open(ctx) {
    return new MirrorTopInstance(ctx.children.backing!);
  },
};
