// package-lock.json is complete: `npm ci` on a fresh clone installs from it as it is. npm's
// ci refuses a lockfile that leaves out any package's optional dependencies, including
// the other platforms' binaries (e.g. @biomejs/cli-win32-x64) that an install on this
// platform never downloads, so both checks below look at the lockfile, not node_modules.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');

interface LockEntry {
  optionalDependencies?: Record<string, string>;
  link?: boolean;
  resolved?: string;
}
interface Lockfile {
  lockfileVersion: number;
  packages: Record<string, LockEntry>;
}

/** Where Node would find `name` from the package installed at `path` (its own node_modules, then up). */
function resolveInLock(lock: Lockfile, path: string, name: string): string | undefined {
  let dir = path;
  for (;;) {
    const candidate = dir === '' ? `node_modules/${name}` : `${dir}/node_modules/${name}`;
    if (candidate in lock.packages) return candidate;
    if (dir === '') return undefined;
    const up = dir.lastIndexOf('/node_modules/');
    dir = up < 0 ? '' : dir.slice(0, up);
  }
}

/** The optional dependencies named in the lockfile that have no entry of their own. */
function missingOptionals(lock: Lockfile): string[] {
  const missing: string[] = [];
  for (const [path, entry] of Object.entries(lock.packages)) {
    for (const name of Object.keys(entry.optionalDependencies ?? {})) {
      if (!resolveInLock(lock, path, name)) missing.push(`${name} (of ${path || 'the root'})`);
    }
  }
  return missing;
}

/** The files npm ci reads: the lockfile, the root's package.json and each workspace's. */
function manifests(lock: Lockfile): string[] {
  const workspaces = Object.values(lock.packages).flatMap((e) =>
    e.link && e.resolved ? [`${e.resolved}/package.json`] : [],
  );
  return ['package.json', 'package-lock.json', ...workspaces];
}

describe('package-lock.json', () => {
  const lock: Lockfile = JSON.parse(readFileSync(join(root, 'package-lock.json'), 'utf8'));

  it('finds a missing optional dependency when there is one', () => {
    const broken: Lockfile = {
      lockfileVersion: 3,
      packages: {
        '': {},
        'node_modules/a': { optionalDependencies: { 'a-linux': '1.0.0', 'a-win32': '1.0.0' } },
        'node_modules/a-linux': {},
        'node_modules/b/node_modules/c': { optionalDependencies: { d: '1.0.0' } },
        'node_modules/b/node_modules/d': {},
      },
    };
    expect(missingOptionals(broken)).toEqual(['a-win32 (of node_modules/a)']);
  });

  it('has an entry for every optional dependency of every package, on every platform', () => {
    expect(lock.lockfileVersion).toBe(3);
    expect(missingOptionals(lock)).toEqual([]);
  });

  it('is what `npm ci` installs from, unchanged (checked offline on a copy of the manifests)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmdisk-ci-'));
    try {
      for (const file of manifests(lock)) {
        mkdirSync(dirname(join(dir, file)), { recursive: true });
        cpSync(join(root, file), join(dir, file));
      }
      // npm ci exits non-zero (EUSAGE) when package.json and the lockfile are out of sync.
      execFileSync(
        'npm',
        ['ci', '--dry-run', '--offline', '--ignore-scripts', '--no-audit', '--no-fund'],
        { cwd: dir, stdio: 'pipe', env: { ...process.env, npm_config_loglevel: 'error' } },
      );
      expect(readFileSync(join(dir, 'package-lock.json'), 'utf8')).toBe(
        readFileSync(join(root, 'package-lock.json'), 'utf8'),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
