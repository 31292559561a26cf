// x-debug-query-block-graph (QEMU's XDbgBlockGraph): every node, backend and job of the
// graph as a vertex, every edge with its name and the permissions it takes and shares,
// for drawing (`vm-disk graph`, QEMU's scripts/render_block_graph.py).
import type { BlockGraph } from './graph.ts';
import { type PermissionName, permNames } from './permissions.ts';

export interface XDbgBlockGraphNode {
  id: number;
  type: 'block-backend' | 'block-job' | 'block-driver';
  name: string;
}

export interface XDbgBlockGraphEdge {
  parent: number;
  child: number;
  /** The child's name in its parent ('file', 'backing', 'root'). */
  name: string;
  perm: PermissionName[];
  'shared-perm': PermissionName[];
}

export interface XDbgBlockGraph {
  nodes: XDbgBlockGraphNode[];
  edges: XDbgBlockGraphEdge[];
}

/**
 * The graph as QEMU's x-debug-query-block-graph answers it. Backends are named as the
 * graph names them (`export:ID`, a job's); a job's own backends are `block-job` vertices.
 */
export function debugQueryBlockGraph(graph: BlockGraph): XDbgBlockGraph {
  const nodes: XDbgBlockGraphNode[] = [];
  const edges: XDbgBlockGraphEdge[] = [];
  const ids = new Map<string, number>();
  const infos = graph.query();
  for (const n of infos) {
    ids.set(n['node-name'], nodes.length + 1);
    nodes.push({ id: nodes.length + 1, type: 'block-driver', name: n['node-name'] });
  }
  for (const n of infos) {
    for (const c of n.children) {
      const child = ids.get(c['node-name']);
      if (child === undefined) continue;
      edges.push({
        parent: ids.get(n['node-name'])!,
        child,
        name: c.child,
        perm: c.perm,
        'shared-perm': c.shared,
      });
    }
  }
  // A job's backends (one per node it uses) are one vertex, as QEMU's job is.
  const users = new Map<string, number>();
  for (const b of graph.backendList()) {
    const edge = b.edge;
    const child = edge && ids.get(edge.node.name);
    if (!edge || child === undefined) continue;
    const type = b.jobChild ? 'block-job' : 'block-backend';
    let id = users.get(`${type} ${b.name}`);
    if (id === undefined) {
      id = nodes.length + 1;
      users.set(`${type} ${b.name}`, id);
      nodes.push({ id, type, name: b.name });
    }
    edges.push({
      parent: id,
      child,
      name: edge.name,
      perm: permNames(edge.perm),
      'shared-perm': permNames(edge.shared),
    });
  }
  return { nodes, edges };
}
