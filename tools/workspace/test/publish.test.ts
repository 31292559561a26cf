// What a published package carries: npm puts a package's own README.md and LICENSE in its
// tarball whatever `files` says, so each public package keeps both, and the license text
// is the one the `license` fields name.
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');
const read = (path: string) => readFileSync(join(root, path), 'utf8');

/** Every workspace folder (packages/*, apps/*, tools/*) with its package.json. */
function workspaces(): {
  dir: string;
  pkg: { name: string; private?: boolean; license?: string };
}[] {
  return ['packages', 'apps', 'tools'].flatMap((group) =>
    readdirSync(join(root, group), { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => `${group}/${e.name}`)
      .map((dir) => ({ dir, pkg: JSON.parse(read(`${dir}/package.json`)) })),
  );
}

describe('publishing', () => {
  const license = read('LICENSE');
  const rootPkg = JSON.parse(read('package.json'));

  it('has one license: the MIT text in LICENSE, named by the root package.json', () => {
    expect(license.split('\n')[0]).toBe('MIT License');
    expect(rootPkg.license).toBe('MIT');
  });

  const publishable = workspaces().filter((w) => !w.pkg.private);
  it('finds the public packages', () => {
    expect(publishable.map((w) => w.pkg.name)).toEqual(
      expect.arrayContaining(['@vmdisk/engine', '@vmdisk/ao', '@vmdisk/nbd', 'vm-disk']),
    );
  });

  for (const { dir, pkg } of publishable) {
    it(`${pkg.name} names the same license and carries its text and a README`, () => {
      expect(pkg.license).toBe(rootPkg.license);
      expect(read(`${dir}/LICENSE`)).toBe(license);
      expect(read(`${dir}/README.md`)).toMatch(new RegExp(`^# ${pkg.name.replace('/', '\\/')}\\n`));
    });
  }
});
