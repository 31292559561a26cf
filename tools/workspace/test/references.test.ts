// The repository stands on its own: no file of it refers to a path outside it. A clone
// has none of the developer's folders, so such a reference is a broken one. Checked in
// every file git tracks (or would track): relative paths that climb out of the
// repository from the file's folder, the notes folder beside the checkout that the
// project once pointed to, absolute paths into a developer's machine, and Markdown links
// to files that do not exist.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');

/** Paths that are never in a clone: developers' workspaces and home folders. */
const OUTSIDE = [/(?<![\w.~-])\/(?:work|home|Users)\/[\w.-]+/g];
/** The folder of notes beside the checkout (`..` + `/shared`), from anywhere in the tree. */
const SIBLING_NOTES = new RegExp(`(?:\\.\\./)+${'shared'}(?=/|\\b)`, 'g');
/** A relative path that starts by climbing: `../x`, `../../x/y`. */
const CLIMBING = /(?<![\w./-])(?:\.\.\/)+[\w@.-][\w@./-]*/g;
/** A Markdown link target that is a relative path (no scheme, no anchor-only). */
const MD_LINK = /\]\((?!https?:|mailto:|#)([^)\s]+)\)/g;

/** What in `text` (the contents of `file`, relative to the root) points outside the repository. */
function outsideReferences(file: string, text: string, rootDir = root): string[] {
  const found: string[] = [];
  const from = dirname(join(rootDir, file));
  const escapes = (target: string) => {
    const rel = relative(rootDir, resolve(from, target));
    return rel === '..' || rel.startsWith(`..${sep}`);
  };
  for (const re of OUTSIDE) for (const m of text.matchAll(re)) found.push(m[0]);
  for (const m of text.matchAll(SIBLING_NOTES)) found.push(m[0]);
  for (const m of text.matchAll(CLIMBING)) if (escapes(m[0])) found.push(m[0]);
  if (file.endsWith('.md')) {
    for (const m of text.matchAll(MD_LINK)) {
      const target = (m[1] ?? '').replace(/#.*$/, '');
      if (target === '') continue;
      if (escapes(target)) found.push(`link ${m[1]}`);
      else if (!existsSync(resolve(from, target))) found.push(`link ${m[1]} (missing)`);
    }
  }
  return [...new Set(found)];
}

function repositoryFiles(): string[] {
  return execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard', '-z'], {
    cwd: root,
    encoding: 'utf8',
  })
    .split('\0')
    .filter((f) => f !== '' && existsSync(join(root, f)) && statSync(join(root, f)).isFile());
}

describe('references to paths outside the repository', () => {
  it('are found when they are there', () => {
    const up = '..';
    const text = [
      `see ${up}/shared/DESIGN.md and ${up}/${up}/shared/spec/nbd.md`,
      `extends ${up}/${up}/tsconfig.base.json, then ${up}/${up}/${up}/elsewhere/x.ts`,
      `cd /${'work'}/main && ls /${'home'}/me; but /mnt/d and /var/tmp/x are container paths`,
      `[ok](../../docs/architecture.md) [gone](no-such-file.md) [out](${up}/${up}/${up}/x.md) [web](https://x.y/z)`,
    ].join('\n');
    expect(outsideReferences('packages/nbd/README.md', text)).toEqual([
      `/${'work'}/main`,
      `/${'home'}/me`,
      `${up}/shared`,
      `${up}/${up}/shared`,
      `${up}/${up}/${up}/elsewhere/x.ts`,
      `${up}/${up}/${up}/x.md`,
      'link no-such-file.md (missing)',
      `link ${up}/${up}/${up}/x.md`,
    ]);
  });

  it('are in no file of the repository', () => {
    const files = repositoryFiles();
    expect(files).toContain('README.md');
    const found: string[] = [];
    for (const file of files) {
      const text = readFileSync(join(root, file), 'utf8');
      if (text.includes('\0')) continue; // binary
      for (const ref of outsideReferences(file, text)) found.push(`${file}: ${ref}`);
    }
    expect(found).toEqual([]);
  });
});
