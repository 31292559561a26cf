// No import cycles between the modules of a package's src/ (issue 12: "no import cycle").
// Type-only imports count too: a cycle of types is a cycle of design (two modules that
// cannot be understood apart), even when the emitted JavaScript has none.
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');

/** The packages checked; the others still have cycles the issue's other parts break. */
const CHECKED = [
  'packages/native/src',
  'packages/engine/src',
  'packages/ao/src',
  'packages/nbd/src',
  'packages/vhost-user/src',
  'packages/fuse/src',
  'packages/block-graph/src',
  'apps/vm-disk/src',
];

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && /\.(ts|mts)$/.test(entry.name))
      out.push(join(entry.parentPath, entry.name));
  }
  return out;
}

/** The relative module specifiers of static and dynamic imports and re-exports. */
function localImports(file: string): string[] {
  const source = readFileSync(file, 'utf8');
  const re =
    /(?:\bimport|\bexport)\s[^'"]*?\bfrom\s*['"](\.[^'"]+)['"]|\bimport\s*\(\s*['"](\.[^'"]+)['"]/g;
  return [...source.matchAll(re)].map((m) => resolve(file, '..', m[1] ?? m[2] ?? ''));
}

/** Each cycle found (as a list of files), by depth-first search. */
function findCycles(graph: Map<string, string[]>): string[][] {
  const cycles: string[][] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (n: string) => {
    state.set(n, 'open');
    stack.push(n);
    for (const m of graph.get(n) ?? []) {
      if (state.get(m) === 'open') cycles.push([...stack.slice(stack.indexOf(m)), m]);
      else if (!state.has(m)) visit(m);
    }
    stack.pop();
    state.set(n, 'done');
  };
  for (const n of graph.keys()) if (!state.has(n)) visit(n);
  return cycles;
}

describe('import cycles', () => {
  it('finds a cycle', () => {
    const g = new Map([
      ['a', ['b']],
      ['b', ['c']],
      ['c', ['a']],
      ['d', ['a']],
    ]);
    expect(findCycles(g)).toEqual([['a', 'b', 'c', 'a']]);
  });

  for (const dir of CHECKED) {
    it(`has none in ${dir}`, () => {
      const files = sourceFiles(join(root, dir));
      const graph = new Map(files.map((f) => [f, localImports(f)]));
      const cycles = findCycles(graph).map((c) => c.map((f) => relative(root, f)).join(' -> '));
      expect(cycles).toEqual([]);
    });
  }
});
