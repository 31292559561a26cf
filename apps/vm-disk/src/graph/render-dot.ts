// The block graph in Graphviz's DOT language, as QEMU's scripts/render_block_graph.py
// draws it from x-debug-query-block-graph: block nodes as boxes (name, driver, file),
// exports and other users as houses, jobs as parallelograms; each edge from parent to
// child, labelled with the child's name and the permissions taken (and, below, shared):
// R consistent-read, W write, U write-unchanged, S resize.

export interface DebugGraph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; name: string; perm: string[]; 'shared-perm': string[] }[];
}

/** What query-named-block-nodes says of a node, by node name. */
export interface NodeDetails {
  drv: string;
  file?: string;
}

const PERM_LETTER: Record<string, string> = {
  'consistent-read': 'R',
  write: 'W',
  'write-unchanged': 'U',
  resize: 'S',
  'graph-mod': 'G',
};

function perms(names: readonly string[]): string {
  return names.map((p) => PERM_LETTER[p] ?? p).join('') || '-';
}

function quote(s: string): string {
  return `"${s.replaceAll('\\', '\\\\').replaceAll('"', '\\"').replaceAll('\n', '\\n')}"`;
}

export function renderDot(graph: DebugGraph, details: ReadonlyMap<string, NodeDetails>): string {
  const lines = [
    'digraph "block graph" {',
    '  node [fontname="Helvetica"];',
    '  edge [fontname="Helvetica", fontsize=10];',
  ];
  for (const n of graph.nodes) {
    if (n.type === 'block-driver') {
      const d = details.get(n.name);
      const label = [n.name, d?.drv, d?.file].filter((x) => x !== undefined).join('\n');
      lines.push(`  n${n.id} [shape=box, label=${quote(label)}];`);
    } else {
      const shape = n.type === 'block-job' ? 'parallelogram' : 'house';
      lines.push(`  n${n.id} [shape=${shape}, label=${quote(n.name || n.type)}];`);
    }
  }
  for (const e of graph.edges) {
    const label = `${e.name}\n${perms(e.perm)} / ${perms(e['shared-perm'])}`;
    lines.push(`  n${e.parent} -> n${e.child} [label=${quote(label)}];`);
  }
  lines.push('}');
  return `${lines.join('\n')}\n`;
}
