// The root scripts: scripts/lib.sh can be sourced from an interactive shell without
// changing it (no shell options, no `exit` on failure), the scripts that source it set
// their own strict mode, and scripts/debian-mirror.sh finds the Debian mirror in apt's
// configuration (both source formats) and invents none.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');
const lib = join(root, 'scripts/lib.sh');
const bash = (script: string) =>
  spawnSync('bash', ['--norc', '--noprofile', '-c', script], { encoding: 'utf8' });

describe('scripts/lib.sh', () => {
  it('changes no shell option of the shell that sources it', () => {
    const r = bash(`set +o; echo "$-"; echo ---; source '${lib}'; set +o; echo "$-"`);
    expect(r.status).toBe(0);
    const [before, after] = r.stdout.split('---\n');
    expect(after).toBe(before);
    expect(after).toContain('set +o errexit');
    expect(after).toContain('set +o pipefail');
  });

  it('reports a failure by its return status, leaving the shell running', () => {
    const r = bash(
      `source '${lib}'; NODE_DIR=/nonexistent/node; PATH=/nonexistent provision_node24; echo "still here $?"`,
    );
    expect(r.stdout).toBe('still here 1\n');
    expect(r.stderr).toContain('missing: npm');
  });

  it('puts a folder first on PATH once, however often it is sourced and run', () => {
    const r = bash(
      `source '${lib}'; PATH=/a:/b:/a:/c; path_prepend /a; echo "$PATH"; path_prepend /z; path_prepend /z; echo "$PATH"`,
    );
    expect(r.stdout).toBe('/a:/b:/c\n/z:/a:/b:/c\n');
  });

  it('is sourced only by scripts that set their own strict mode first', () => {
    const files = execFileSync('git', ['ls-files'], { cwd: root, encoding: 'utf8' })
      .split('\n')
      .filter((f) => f !== '' && f !== 'scripts/lib.sh');
    // Scripts (a #! line), not documents that show how to source it.
    const sourcing = files.filter((f) => {
      const text = read(f);
      return text.startsWith('#!') && /^\s*(source|\.)\s.*lib\.sh/m.test(text);
    });
    expect(sourcing).toEqual(
      expect.arrayContaining(['vm-disk', 'scripts/test.sh', 'scripts/base-image.sh']),
    );
    for (const f of sourcing) {
      const text = read(f);
      const strict = text.search(/^set -euo pipefail$/m);
      expect(strict, `${f} sets -euo pipefail`).toBeGreaterThanOrEqual(0);
      expect(strict, `${f} sets it before sourcing lib.sh`).toBeLessThan(
        text.search(/^\s*(source|\.)\s.*lib\.sh/m),
      );
    }
  });
});

function read(file: string): string {
  try {
    return readFileSync(join(root, file), 'utf8');
  } catch {
    return ''; // a deleted file git still lists, or a folder (a submodule)
  }
}

describe('scripts/debian-mirror.sh', () => {
  let dir: string;
  let etc: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vmdisk-apt-'));
    etc = join(dir, 'etc');
    mkdirSync(join(etc, 'sources.list.d'), { recursive: true });
    mkdirSync(join(etc, 'apt.conf.d'));
    // apt-config reads the files named here instead of the machine's own.
    writeFileSync(
      join(dir, 'apt.conf'),
      `Dir::Etc "${etc}";\nDir::Etc::sourcelist "sources.list";\nDir::Etc::sourceparts "sources.list.d";\nDir::Etc::parts "apt.conf.d";\n`,
    );
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const mirror = (...args: string[]) =>
    spawnSync(join(root, 'scripts/debian-mirror.sh'), args, {
      encoding: 'utf8',
      env: { ...process.env, APT_CONFIG: join(dir, 'apt.conf') },
    });

  it('takes the archive of the suite from deb822 sources, not the security archive', () => {
    writeFileSync(
      join(etc, 'sources.list.d/debian.sources'),
      [
        'Types: deb',
        'URIs: http://security.example/debian-security',
        'Suites: bookworm-security',
        'Components: main',
        '',
        'Types: deb-src deb',
        '# a comment inside a stanza',
        'URIs: http://mirror.example/debian/',
        'Suites: bookworm bookworm-updates',
        'Components: main',
        '',
      ].join('\n'),
    );
    const r = mirror('bookworm');
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('http://mirror.example/debian\n');
  });

  it('reads one-line sources with options, and skips deb-src and disabled stanzas', () => {
    writeFileSync(
      join(etc, 'sources.list'),
      '# deb http://commented.example/debian bookworm main\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] https://one.example/debian bookworm main contrib\n',
    );
    writeFileSync(
      join(etc, 'sources.list.d/a.sources'),
      'Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n',
    );
    expect(mirror().stdout).toBe('https://one.example/debian\n');
  });

  it("falls back to another release suite's archive", () => {
    writeFileSync(
      join(etc, 'sources.list.d/debian.sources'),
      'Types: deb\nURIs: http://other.example/debian\nSuites: trixie-updates trixie\n',
    );
    expect(mirror('bookworm').stdout).toBe('http://other.example/debian\n');
  });

  it('fails with a clear message when apt has no Debian archive', () => {
    const r = mirror('bookworm');
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('apt has no Debian archive configured');
    expect(r.stderr).toContain("'Suites: bookworm'");
  });
});
