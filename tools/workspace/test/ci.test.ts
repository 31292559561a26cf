// CI runs the README's test command: .ci/run names it itself (it does not read the
// README at run time), and this checks that it is the command of Quick start's line 2.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../../..');
const read = (file: string) => readFileSync(join(root, file), 'utf8');

/** Line `n` (from 1) of the first ```sh block of the README's "## Quick start" section. */
function quickStartLine(readme: string, n: number): string | undefined {
  const section = readme.split(/^## /m).find((s) => s.startsWith('Quick start\n'));
  const block = section?.match(/^```sh\n([\s\S]*?)^```/m)?.[1];
  return block?.split('\n')[n - 1]?.trim();
}

/** The command .ci/run ends by running: its `exec` line. */
function ciCommand(script: string): string | undefined {
  const execs = script
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('exec '));
  return execs.length === 1 ? execs[0]?.slice('exec '.length).trim() : undefined;
}

describe('.ci/run', () => {
  const script = read('.ci/run');

  it('finds the commands it compares', () => {
    const readme = '# x\n\n## Quick start\n\n```sh\n./a demo\n./b test\n```\n\n## Next\n';
    expect(quickStartLine(readme, 2)).toBe('./b test');
    expect(ciCommand('#!/bin/sh\nset -e\nexec ./b test\n')).toBe('./b test');
    expect(ciCommand('exec a\nexec b\n')).toBeUndefined();
  });

  it("runs the README's test command (Quick start, line 2)", () => {
    const command = quickStartLine(read('README.md'), 2);
    expect(command).toBeDefined();
    expect(ciCommand(script)).toBe(command);
  });

  it('does not read the README at run time', () => {
    const code = script.split('\n').filter((l) => !l.trim().startsWith('#'));
    expect(code.filter((l) => /README/.test(l))).toEqual([]);
  });
});
