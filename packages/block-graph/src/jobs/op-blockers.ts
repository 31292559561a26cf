// QEMU's op blockers, for what block jobs need of them: a node a job uses is busy for
// other jobs, graph changes (blockdev-del, snapshots) and resizes while the job runs, and
// the backing links a job will change (stream, commit) are frozen. Kept per graph; the
// graph asks here before it removes a node or changes a backing link.
import { BlockError, BlockErrorCode } from '../errors.ts';

/** Who blocks what, per graph (keyed by the graph object). */
interface Blockers {
  /** node name -> the reason ("block device is in use by block job: stream"). */
  readonly busy: Map<string, string>;
  /** parent node name -> the child node its backing link may not leave. */
  readonly frozen: Map<string, string>;
}

const byGraph = new WeakMap<object, Blockers>();

function of(graph: object): Blockers {
  let b = byGraph.get(graph);
  if (!b) {
    b = { busy: new Map(), frozen: new Map() };
    byGraph.set(graph, b);
  }
  return b;
}

/** Marks `nodes` busy for `reason` until `unblock` is called with the same names. */
export function blockNodes(graph: object, nodes: readonly string[], reason: string): void {
  const b = of(graph);
  for (const n of nodes) b.busy.set(n, reason);
}

export function unblockNodes(graph: object, nodes: readonly string[]): void {
  const b = of(graph);
  for (const n of nodes) b.busy.delete(n);
}

/** Throws QEMU's "Node 'x' is busy: REASON" when a job uses the node. */
export function checkNotBusy(graph: object, node: string): void {
  const reason = byGraph.get(graph)?.busy.get(node);
  if (reason !== undefined) {
    throw new BlockError(BlockErrorCode.NODE_BUSY, `Node '${node}' is busy: ${reason}`);
  }
}

/** Freezes the backing links parent -> child given (bdrv_freeze_backing_chain). */
export function freezeLinks(graph: object, links: readonly [string, string][]): void {
  const b = of(graph);
  for (const [parent, child] of links) b.frozen.set(parent, child);
}

export function unfreezeLinks(graph: object, links: readonly [string, string][]): void {
  const b = of(graph);
  for (const [parent] of links) b.frozen.delete(parent);
}

/** Throws QEMU's "Cannot change 'backing' link from 'P' to 'C'" for a frozen link. */
export function checkLinkNotFrozen(graph: object, parent: string): void {
  const child = byGraph.get(graph)?.frozen.get(parent);
  if (child !== undefined) {
    throw new BlockError(
      BlockErrorCode.NODE_BUSY,
      `Cannot change 'backing' link from '${parent}' to '${child}'`,
    );
  }
}

/** The child a frozen link of `parent` must keep, if its link is frozen. */
export function frozenChild(graph: object, parent: string): string | undefined {
  return byGraph.get(graph)?.frozen.get(parent);
}
