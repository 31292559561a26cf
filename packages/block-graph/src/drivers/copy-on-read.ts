// The `copy-on-read` filter: what a read finds below the top layer of its child (in the
// backing chain) is written into the top layer, so that later reads find it there. The
// copy is serialised against writes to the same range of the child, so a guest write is
// never overwritten by older data. `bottom` (QEMU 7.2's option, block-stream's filter)
// limits the copy to data allocated down to and including that layer of the chain.

import type { BdrvChild, BlockDriver, ChildNode, FilterInstance } from '../driver.ts';
import { BlockOptionError } from '../errors.ts';
import { BLK_PERM_WRITE_UNCHANGED, defaultChildPerms } from '../permissions.ts';
import { opt, str } from '../schema.ts';

/** Whether a backing (cow) child hangs below the node, through filters and formats' primary children. */
function hasBacking(node: ChildNode): boolean {
  for (let n: ChildNode | undefined = node; n; n = n.primary?.node) {
    if (n.backing) return true;
  }
  return false;
}

/** The node and its backing layers, top first (as block status depth counts them). */
function chainBelow(node: ChildNode): ChildNode[] {
  const out: ChildNode[] = [node];
  for (let b = node.backing; b; b = b.node.backing) out.push(b.node);
  return out;
}

class CopyOnReadInstance implements FilterInstance {
  readonly kind = 'filter';
  /** Bytes copied up so far (for queries). */
  private copied = 0;

  readonly child: BdrvChild;
  /** The deepest allocation depth copied up (block status depth; Infinity: the whole chain). */
  private readonly maxDepth: number;

  constructor(child: BdrvChild, maxDepth: number) {
    this.child = child;
    this.maxDepth = maxDepth;
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
      if (s.depth <= 1 || s.depth > this.maxDepth || !node.isFormat || node.readOnly) {
        // In the top layer already, below bottom, or nothing anywhere (zeros): no copy.
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
  options: { bottom: opt(str) },
  children: [{ key: 'file', required: true, roles: () => ['filtered', 'primary'] }],
  childPerms(roles, perm, shared, writable) {
    const p = defaultChildPerms(roles, perm, shared, writable);
    // Copying writes what was there already.
    return { perm: p.perm | BLK_PERM_WRITE_UNCHANGED, shared: p.shared };
  },
  async open(ctx) {
    const file = ctx.children.file!;
    const bottom = (ctx.options as { bottom?: string }).bottom;
    let maxDepth = Number.POSITIVE_INFINITY;
    if (bottom !== undefined) {
      // Depth d is layer d-1 of the chain (1: the file's top layer).
      const at = chainBelow(file.node).findIndex((n) => n.name === bottom);
      // QEMU looks the node up anywhere; one outside the chain is found here as missing.
      if (at < 0) throw new BlockOptionError('bottom', '', `Bottom node '${bottom}' not found`);
      maxDepth = at + 1;
    }
    return new CopyOnReadInstance(file, maxDepth);
  },
};
