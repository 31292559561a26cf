// The image subcommands used wrongly exit as qemu-img's do: an unknown option of create,
// info, map, commit, rebase (status 1; measure answers with its help, status 0), a bad -o
// of create, and an unknown subcommand, which is named with the list of known ones.
import { describe, expect, it } from 'vitest';
import { COMMANDS } from '../src/main.ts';
import { qemuImg, vmDisk } from './harness/img.ts';

describe('image subcommands used wrongly', () => {
  it.each([
    ['create', '--bogus', 'x', '1M'],
    ['create', '-x', 'x', '1M'],
    ['create', '-f', 'qcow2', '-o', 'frob=1', '/nonexistent-dir/x.qcow2', '1M'],
    ['info', '--bogus', 'x'],
    ['info', '-x', 'x'],
    ['info'],
    ['map', '--bogus', 'x'],
    ['map'],
    ['commit', '--bogus', 'x'],
    ['rebase', '--bogus', 'x'],
    ['measure', '--bogus'],
    ['compare', '--bogus', 'x', 'y'],
  ])('%s %s: the exit status of qemu-img', async (...args) => {
    const a = await vmDisk(args);
    const b = await qemuImg(args);
    expect(a.code, a.stderr).toBe(b.code);
  });

  it('an unknown subcommand: named, with the known ones, exit status 1 as qemu-img', async () => {
    const a = await vmDisk(['frobnicate', 'x']);
    const b = await qemuImg(['frobnicate', 'x']);
    expect(a.code).toBe(b.code);
    expect(a.stderr).toContain('Command not found: frobnicate');
    for (const c of ['commit', 'rebase', 'measure', 'info', 'map', 'create'])
      expect(COMMANDS).toContain(c);
    expect(a.stderr).toContain(`Known commands: ${COMMANDS.join(', ')}`);
  });
});
