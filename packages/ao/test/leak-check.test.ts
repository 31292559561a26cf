// The global after-each check (test/setup.ts, wired in vitest.config.ts) fails a test that
// leaves an ao live: run a fixture test file in a child vitest and read its verdict.
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';

const here = dirname(fileURLToPath(import.meta.url));
const fixtures = join(here, 'fixtures');
const vitestBin = join(here, '../../../node_modules/vitest/vitest.mjs');

it('a leaked ao fails the test that leaked it (kind and stack named), not the next one', async () => {
  const { code, output } = await new Promise<{ code: number | null; output: string }>((resolve) => {
    execFile(
      process.execPath,
      [vitestBin, 'run', '--config', join(fixtures, 'vitest.config.ts'), '--root', fixtures],
      { cwd: fixtures, env: { ...process.env, NO_COLOR: '1', CI: '1' } },
      (err, stdout, stderr) =>
        resolve({
          code: err ? ((err as { code?: number }).code ?? 1) : 0,
          output: stdout + stderr,
        }),
    );
  });
  expect(code).not.toBe(0);
  expect(output).toContain('asynchronous operation(s) left live');
  expect(output).toContain('fixture-leak');
  expect(output).toContain('leak.fixture.ts');
  expect(output).toMatch(/1 failed.*1 passed|1 passed.*1 failed/);
}, 60_000);
