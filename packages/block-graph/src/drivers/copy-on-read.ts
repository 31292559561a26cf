// The `copy-on-read` filter: what a read finds below the top layer of its child (in the
// backing chain) is written into the top layer, so that later reads find it there. The
// copy is serialised against writes to the same range of the child, so a guest write is
// never overwritten by older data.

import type { BdrvChild, BlockDriver, ChildNode, FilterInstance } from '../driver.ts';
import { BLK_PERM_WRITE_UNCHANGED, defaultChildPerms } from '../permissions.ts';

/** Whether a backing (cow) child hangs below the node, through filters and formats' primary children. */
function hasBacking(node: ChildNode): boolean {
  for (let n: ChildNode | undefined = node; n; n = n.primary?.node) {
    if (n.backing) return true;
  }
  return false;
}

class CopyOnReadInstance implements FilterInstance {
  readonly kind = 'filter';
  /** Bytes copied up so far (for queries). */
  private copied = 0;

  readonly child: BdrvChild;

  constructor(child: BdrvChild) {
    this.child = child;
    child.node.enableTracking();
  }

  size(): number {
    return this.child.node.size();
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    const node = this.child.node;
    // Nothing to copy up without a backing chain below (e.g. over raw or a protocol).
    if (!hasBacking(node)) return node.read(offset, buf);
    node.enableTracking();
    let pos = 0;
    while (pos < buf.byteLength) {
      const s = await node.blockStatus(offset + pos, buf.byteLength - pos);
      const sub = buf.subarray(pos, pos + s.length);
      if (s.depth <= 1 || !node.isFormat || node.readOnly) {
        // In the top layer already, or nothing anywhere (zeros): nothing to copy.
        await node.read(offset + pos, sub);
      } else {
        const hold = await node.serialise(offset + pos, offset + pos + s.length);
        try {
          await node.read(offset + pos, sub);
          await node.write(offset + pos, sub, { owner: hold });
          this.copied += s.length;
        } finally {
          node.release(hold);
        }
      }
      pos += s.length;
    }
  }

  info(): Record<string, unknown> {
    return { 'copied-bytes': this.copied };
  }
}

export const copyOnReadDriver: BlockDriver = {
  name: 'copy-on-read',
  options: {},
  children: [{ key: 'file', required: true, roles: () => ['filtered', 'primary'] }],
  childPerms(roles, perm, shared, writable) {
    const p = defaultChildPerms(roles, perm, shared, writable);
    // Copying writes what was there already.
    return { perm: p.perm | BLK_PERM_WRITE_UNCHANGED, shared: p.shared };
  },
  async open(ctx) {
    return new CopyOnReadInstance(ctx.children.file!);
  },
};
