import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const run = promisify(execFile);
const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url));

describe('the built vm-disk bin', () => {
  it('prints its help and exits 0', async () => {
    const { stdout } = await run(process.execPath, [cli, '--help']);
    expect(stdout).toMatch(/^Usage:\n {2}vm-disk demo/m);
    expect(stdout).toContain('@vmdisk/engine');
  });

  it('prints its version', async () => {
    const { stdout } = await run(process.execPath, [cli, '--version']);
    expect(stdout.trim()).toMatch(/^vm-disk \d+\.\d+\.\d+$/);
  });

  it('refuses an unknown option with exit status 2, naming the option', async () => {
    const failure = await run(process.execPath, [cli, '--bogus']).catch((e) => e);
    expect(failure.code).toBe(2);
    expect(failure.stderr).toContain("'--bogus'");
  });
});
