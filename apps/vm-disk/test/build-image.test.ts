// scripts/build-image.mjs without docker: its usage, and --stage-only, which stages the
// image's build context (the bundled CLI, koffi, the launcher, the Dockerfile) into a
// folder it creates or finds empty, and never deletes one it was given.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

const SCRIPT = fileURLToPath(new URL('../scripts/build-image.mjs', import.meta.url));
const run = (...args: string[]) =>
  spawnSync(process.execPath, [SCRIPT, ...args], { encoding: 'utf8' });

describe('build-image.mjs', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vmdisk-build-image-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('prints its usage for --help', () => {
    const r = run('--help');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Usage: .*build-image\.mjs \[--base IMAGE\] \[--tag TAG\]/);
    expect(r.stderr).toBe('');
  });

  it('refuses an unknown option with the usage, not a stack trace', () => {
    const r = run('--bogus');
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("build-image: Unknown option '--bogus'");
    expect(r.stderr).toContain('Usage:');
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('--stage-only refuses a folder that is not empty and leaves it as it was', () => {
    const mine = join(dir, 'mine');
    mkdirSync(mine);
    writeFileSync(join(mine, 'precious.txt'), 'keep me');
    const r = run('--stage-only', mine);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('not an empty folder');
    expect(readFileSync(join(mine, 'precious.txt'), 'utf8')).toBe('keep me');
    expect(existsSync(join(mine, 'bin'))).toBe(false);
  });

  it('--stage-only stages a context whose bundled CLI runs', () => {
    const stage = join(dir, 'new', 'context');
    const r = run('--stage-only', stage);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(stage);
    for (const f of [
      'Dockerfile',
      'bin/vm-disk',
      'lib/vm-disk.mjs',
      'lib/vm-disk.cjs',
      'lib/node_modules/koffi',
    ]) {
      expect(existsSync(join(stage, f)), f).toBe(true);
    }
    const version = spawnSync(process.execPath, [join(stage, 'lib/vm-disk.mjs'), '--version'], {
      encoding: 'utf8',
    });
    expect(version.stdout).toMatch(/^vm-disk \d+\.\d+\.\d+\n$/);
  });
});
