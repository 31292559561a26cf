// `vm-disk demo`, the built-in default: makes its images once, serves the overlay, and
// leaves a clean qcow2 behind when stopped with Ctrl-C (SIGINT).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { demoText } from '../src/demo.ts';
import { CLI, type RunningProcess, run, start, waitFor } from './harness/daemon.ts';

let dir: string;
let demo: RunningProcess | undefined;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-demo-'));
});
afterEach(async () => {
  await demo?.stop('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

async function startDemo(): Promise<{ uri: string; out: () => string }> {
  let out = '';
  demo = start(process.execPath, [CLI, 'demo', '--dir', dir, '--port', '0']);
  demo.child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    out += d;
  });
  await waitFor('the demo to print its URI', () => /NBD export\s+nbd:\/\//.test(out));
  const uri = /NBD export\s+(nbd:\/\/\S+)/.exec(out)?.[1] as string;
  return { uri, out: () => out };
}

describe('vm-disk demo', () => {
  it('serves a qcow2 overlay of a recognisable base, and stops clean on SIGINT', async () => {
    const { uri, out } = await startDemo();
    expect(out()).toContain('qemu-img info');
    expect(out()).toContain('nbdinfo --map');
    const info = JSON.parse(await run('qemu-img', ['info', '--output=json', uri]));
    expect(info['virtual-size']).toBe(64 << 20);
    const text = demoText(5);
    const dump = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `read -v ${5 << 20} ${text.length}`,
      uri,
    ]);
    const bytes = [...dump.matchAll(/^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} )+)/gm)].flatMap((m) =>
      (m[1] as string).trim().split(' '),
    );
    expect(Buffer.from(bytes.map((h) => Number.parseInt(h, 16))).toString()).toBe(text);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 1M 64k', uri]);
    expect(await demo?.stop('SIGINT')).toBe(0);
    // Stopped clean: no leaks, no corruption, not dirty; the write is in the overlay only.
    const check = await run('qemu-img', ['check', '--output=json', join(dir, 'overlay.qcow2')]);
    expect(JSON.parse(check)).toMatchObject({ 'check-errors': 0 });
    expect(JSON.parse(check).leaks ?? 0).toBe(0);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x55 1M 64k', join(dir, 'overlay.qcow2')]);
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `read -P 0 ${(1 << 20) + 4096} 60k`,
      join(dir, 'base.raw'),
    ]);

    // A second start reuses the images: what was written is still there.
    const again = await startDemo();
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x55 1M 64k', again.uri]);
  });
});
