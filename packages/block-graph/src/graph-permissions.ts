// The permission pass of a graph change (QEMU's bdrv_refresh_perms): every edge's
// permissions recomputed from the backends down, checked (parents share what each other
// takes; read-only nodes are not written), then applied to the drivers that hold something
// for them (image locks) as one transaction.

import type { BlockBackend } from './backend.ts';
import type { BlockDriver } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import type { BlockNode, ChildEdge, ChildParent } from './node.ts';
import {
  BLK_PERM_ALL,
  BLK_PERM_RESIZE,
  BLK_PERM_WRITE,
  BLK_PERM_WRITE_UNCHANGED,
  defaultChildPerms,
  permNames,
} from './permissions.ts';

type Perms = { perm: number; shared: number };

/**
 * A parent as QEMU's permission errors name it (bdrv_child_user_desc): a node, a block
 * job ("commit job 'c'"), or a BlockBackend (qemu-storage-daemon's are all unnamed).
 */
function parentDesc(p: ChildParent): string {
  if (!p.isBackend) return `node '${p.name}'`;
  return p.jobChild ? p.name : 'an unnamed block device';
}

/**
 * Tells the instances that hold something for their permissions (image locks) about the
 * new ones, as one transaction: every check first; when one refuses, the others are
 * aborted and the refusal thrown; then every change is committed.
 */
function applyNodePerms(nodePerm: Map<BlockNode, Perms>): void {
  const checked: BlockNode[] = [];
  try {
    for (const [n, p] of nodePerm) {
      if (!n.instance?.checkPerm) continue;
      n.instance.checkPerm(p.perm, p.shared);
      checked.push(n);
    }
  } catch (err) {
    for (const n of checked) n.instance!.abortPerm?.();
    throw err;
  }
  for (const n of checked) {
    const p = nodePerm.get(n)!;
    n.instance!.setPerm?.(p.perm, p.shared);
  }
}

/**
 * Recomputes every edge's permissions from the backends down and checks them: a node's
 * parents must share what each other takes, and a read-only node may not be written.
 * Nothing changes when it throws.
 */
export function refreshPermissions(
  graphNodes: ReadonlyMap<string, BlockNode>,
  backends: Iterable<BlockBackend>,
  drivers: ReadonlyMap<string, BlockDriver>,
): void {
  const nodes = [...graphNodes.values()];
  // Kahn's order: a node after all of its parent nodes.
  const pending = new Map<BlockNode, number>();
  for (const n of nodes) {
    let count = 0;
    for (const e of n.parents) if (!e.parent.isBackend && graphNodes.has(e.parent.name)) count++;
    pending.set(n, count);
  }
  const order: BlockNode[] = nodes.filter((n) => pending.get(n) === 0);
  for (let i = 0; i < order.length; i++) {
    for (const e of order[i]!.children.values()) {
      const left = pending.get(e.node)! - 1;
      pending.set(e.node, left);
      if (left === 0) order.push(e.node);
    }
  }
  if (order.length !== nodes.length) {
    throw new BlockError(
      BlockErrorCode.BAD_GRAPH_CHANGE,
      'the change would make a cycle in the graph',
    );
  }
  const edgePerm = new Map<ChildEdge, Perms>();
  const nodePerm = new Map<BlockNode, Perms>();
  for (const b of backends) {
    const e = b.edge;
    if (e) edgePerm.set(e, { perm: e.perm, shared: e.shared });
  }
  for (const n of order) {
    let perm = 0;
    let shared = BLK_PERM_ALL;
    const parents = [...n.parents];
    for (const e of parents) {
      const p = edgePerm.get(e) ?? { perm: e.perm, shared: e.shared };
      edgePerm.set(e, p);
      perm |= p.perm;
      shared &= p.shared;
    }
    for (const a of parents) {
      for (const b of parents) {
        if (a === b) continue;
        const conflict = edgePerm.get(a)!.perm & ~edgePerm.get(b)!.shared;
        if (conflict) {
          // QEMU's wording (bdrv_a_allow_b).
          throw new BlockError(
            BlockErrorCode.PERMISSION_CONFLICT,
            `Permission conflict on node '${n.name}': permissions '${permNames(conflict).join(', ')}' are both required by ${parentDesc(a.parent)} (uses node '${n.name}' as '${a.name}' child) and unshared by ${parentDesc(b.parent)} (uses node '${n.name}' as '${b.name}' child).`,
          );
        }
      }
    }
    if (n.readOnly && perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE)) {
      // QEMU's wording (bdrv_node_check_perm), checked after the parents' conflicts as
      // bdrv_do_refresh_perms does; `node` lets a reopen word it as QEMU does.
      throw Object.assign(
        new BlockError(BlockErrorCode.PERMISSION_CONFLICT, 'Block node is read-only'),
        { node: n.name },
      );
    }
    nodePerm.set(n, { perm, shared });
    const driver = drivers.get(n.driver);
    for (const c of n.children.values()) {
      const p = driver?.childPerms
        ? driver.childPerms(c.roles, perm, shared, !n.readOnly)
        : defaultChildPerms(c.roles, perm, shared, !n.readOnly);
      if (c.node.settings.forceShare) p.shared = BLK_PERM_ALL;
      edgePerm.set(c, p);
    }
  }
  applyNodePerms(nodePerm);
  for (const [e, p] of edgePerm) {
    e.perm = p.perm;
    e.shared = p.shared;
  }
  for (const [n, p] of nodePerm) {
    n.perm = p.perm;
    n.shared = p.shared;
  }
}
