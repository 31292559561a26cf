// The dependency rule of docs/architecture.md, checked three ways so that breaking it fails
// CI: the package.json dependencies, the import specifiers in the sources, and the project
// graph nx builds from them.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');

/** docs/architecture.md, "The dependency rule": which workspace packages each may use. */
const ALLOWED: Record<string, string[]> = {
  '@vmdisk/native': [],
  '@vmdisk/engine': [],
  '@vmdisk/ao': [],
  '@vmdisk/nbd': ['@vmdisk/ao'],
  '@vmdisk/vhost-user': ['@vmdisk/native', '@vmdisk/nbd'],
  '@vmdisk/fuse': ['@vmdisk/native'],
  '@vmdisk/block-graph': ['@vmdisk/engine', '@vmdisk/ao', '@vmdisk/nbd'],
  'vm-disk': [
    '@vmdisk/native',
    '@vmdisk/engine',
    '@vmdisk/ao',
    '@vmdisk/nbd',
    '@vmdisk/vhost-user',
    '@vmdisk/fuse',
    '@vmdisk/block-graph',
  ],
};
const DIRS: Record<string, string> = {
  '@vmdisk/native': 'packages/native',
  '@vmdisk/engine': 'packages/engine',
  '@vmdisk/ao': 'packages/ao',
  '@vmdisk/nbd': 'packages/nbd',
  '@vmdisk/vhost-user': 'packages/vhost-user',
  '@vmdisk/fuse': 'packages/fuse',
  '@vmdisk/block-graph': 'packages/block-graph',
  'vm-disk': 'apps/vm-disk',
};
const isOurs = (name: string) => name in ALLOWED;

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    if (/(^|\/)(node_modules|dist|\.reports)(\/|$)/.test(relative(dir, path))) continue;
    if (entry.isFile() && /\.(ts|mts|js|mjs)$/.test(entry.name)) out.push(path);
  }
  return out;
}

/** The module specifiers of static imports, exports, dynamic imports and requires. */
function specifiers(source: string): string[] {
  const re =
    /(?:\bimport|\bexport)\s[^'"]*?\bfrom\s*['"]([^'"]+)['"]|\bimport\s*['"]([^'"]+)['"]|\b(?:import|require)\s*\(\s*['"]([^'"]+)['"]/g;
  return [...source.matchAll(re)].map((m) => m[1] ?? m[2] ?? m[3] ?? '');
}

/** The workspace package a specifier in `file` reaches, if any. */
function reaches(file: string, spec: string): string | undefined {
  const bare = spec.match(/^(@[^/]+\/[^/]+|[^./][^/]*)/)?.[1];
  if (bare && isOurs(bare)) return bare;
  if (!spec.startsWith('.')) return undefined;
  const target = relative(root, resolve(file, '..', spec));
  return Object.keys(DIRS).find((name) => target.startsWith(`${DIRS[name]}/`));
}

describe('the dependency rule of docs/architecture.md', () => {
  it('finds the import specifiers it checks', () => {
    expect(
      specifiers(
        `import a from 'x';\nimport { b } from "@vmdisk/ao";\nexport * from '../y.ts';\nimport 'side';\nawait import('dyn');\nrequire('req');\nimport type { T } from '@vmdisk/nbd';`,
      ),
    ).toEqual(['x', '@vmdisk/ao', '../y.ts', 'side', 'dyn', 'req', '@vmdisk/nbd']);
  });

  for (const [name, dir] of Object.entries(DIRS)) {
    it(`${name} declares only the workspace dependencies it may have`, () => {
      const pkg = JSON.parse(readFileSync(join(root, dir, 'package.json'), 'utf8'));
      expect(pkg.name).toBe(name);
      const declared = [
        'dependencies',
        'devDependencies',
        'peerDependencies',
        'optionalDependencies',
      ]
        .flatMap((field) => Object.keys(pkg[field] ?? {}))
        .filter(isOurs);
      expect(declared.filter((d) => !ALLOWED[name]?.includes(d))).toEqual([]);
    });

    it(`${name} imports nothing of ours outside its own directory but what it may use`, () => {
      const violations: string[] = [];
      for (const file of sourceFiles(join(root, dir))) {
        for (const spec of specifiers(readFileSync(file, 'utf8'))) {
          const target = reaches(file, spec);
          if (target === name) {
            if (!spec.startsWith('.'))
              violations.push(`${relative(root, file)}: '${spec}' (itself by name)`);
          } else if (target && (spec.startsWith('.') || !ALLOWED[name]?.includes(target))) {
            violations.push(`${relative(root, file)}: '${spec}' reaches ${target}`);
          }
        }
      }
      expect(violations).toEqual([]);
    });
  }

  it('holds in the project graph nx builds', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmdisk-graph-'));
    try {
      const file = join(dir, 'graph.json');
      execFileSync('npx', ['nx', 'graph', `--file=${file}`], {
        cwd: root,
        stdio: 'pipe',
        env: { ...process.env, NX_DAEMON: 'false', NX_NO_CLOUD: 'true' },
      });
      const { graph } = JSON.parse(readFileSync(file, 'utf8'));
      const deps = (name: string): string[] =>
        (graph.dependencies[name] ?? []).map((d: { target: string }) => d.target).filter(isOurs);
      for (const name of Object.keys(ALLOWED)) {
        expect(graph.nodes[name], `nx knows ${name}`).toBeDefined();
        expect(
          deps(name).filter((d) => !ALLOWED[name]?.includes(d)),
          name,
        ).toEqual([]);
      }
      expect(deps('@vmdisk/native')).toEqual([]);
      expect(deps('@vmdisk/engine')).toEqual([]);
      expect(deps('@vmdisk/ao')).toEqual([]);
      expect(deps('@vmdisk/nbd')).not.toContain('@vmdisk/block-graph');
      expect(deps('@vmdisk/vhost-user')).not.toContain('@vmdisk/block-graph');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('@vmdisk/test-support imports nothing of ours and serves only tests, as a devDependency', () => {
    const outOfPlace: string[] = [];
    for (const file of sourceFiles(join(root, 'tools/test-support'))) {
      for (const spec of specifiers(readFileSync(file, 'utf8')))
        if (reaches(file, spec) || spec.startsWith('@vmdisk/')) outOfPlace.push(spec);
    }
    for (const [name, dir] of Object.entries(DIRS)) {
      const pkg = JSON.parse(readFileSync(join(root, dir, 'package.json'), 'utf8'));
      if (pkg.dependencies?.['@vmdisk/test-support']) outOfPlace.push(`${name} dependencies`);
      for (const file of sourceFiles(join(root, dir))) {
        if (relative(join(root, dir), file).startsWith('test/')) continue;
        if (specifiers(readFileSync(file, 'utf8')).includes('@vmdisk/test-support'))
          outOfPlace.push(relative(root, file));
      }
    }
    expect(outOfPlace).toEqual([]);
  });
});
