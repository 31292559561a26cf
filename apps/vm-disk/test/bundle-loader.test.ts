// The built bin's start-up (src/bundle-loader.ts, src/koffi-direct.ts): dist/vm-disk.cjs
// compiled through a code cache written after a successful run, one file per subcommand,
// and koffi's binary loaded without koffi's loader.
import { execFileSync, spawnSync } from 'node:child_process';
import {
  chmodSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CLI } from './harness/daemon.ts';

let dir: string;
let cache: string;
let image: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-bundle-'));
  cache = join(dir, 'cache');
  image = join(dir, 'a.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

function vmdisk(args: string[], env: Record<string, string> = { VMDISK_CODE_CACHE: cache }) {
  return spawnSync(CLI, args, { encoding: 'utf8', env: { ...process.env, ...env } });
}

const files = (): string[] => readdirSync(cache).sort();

describe('the bin code cache', () => {
  it('is written after a successful run, one file per command, private to the user', () => {
    expect(vmdisk(['info', image]).status).toBe(0);
    expect(files()).toHaveLength(1);
    const [info] = files();
    expect(info).toMatch(
      new RegExp(`^[0-9a-f]+-\\d+-${process.version}-${process.arch}-[0-9a-f]+-info\\.bin$`),
    );
    expect(statSync(cache).mode & 0o777).toBe(0o700);
    expect(statSync(join(cache, info!)).mode & 0o777).toBe(0o600);
    expect(statSync(join(cache, info!)).size).toBeGreaterThan(100_000);

    expect(vmdisk(['map', image]).status).toBe(0);
    expect(files()).toEqual([info, info!.replace(/-info\.bin$/, '-map.bin')].sort());
  });

  it('is used as it is by the next run, and not rewritten', () => {
    expect(vmdisk(['info', image]).status).toBe(0);
    const file = join(cache, files()[0]!);
    const before = readFileSync(file);
    const mtime = statSync(file).mtimeMs;
    const r = vmdisk(['info', '--output=json', image]);
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 1 << 20 });
    expect(statSync(file).mtimeMs).toBe(mtime);
    expect(readFileSync(file).equals(before)).toBe(true);
  });

  it('a damaged cache is refused by V8: the command still works and the file is rewritten', () => {
    expect(vmdisk(['info', image]).status).toBe(0);
    const file = join(cache, files()[0]!);
    const good = readFileSync(file);
    writeFileSync(file, Buffer.alloc(good.length, 0x5a));
    const r = vmdisk(['info', image]);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('file format: qcow2');
    expect(readFileSync(file)[0]).not.toBe(0x5a);
    expect(files()).toHaveLength(1);
  });

  it("replaces the command's cache of an older build, and leaves other flags' and commands'", () => {
    expect(vmdisk(['info', image]).status).toBe(0);
    const [made] = files();
    const rest = made!.replace(/^[0-9a-f]+-\d+-/, '');
    rmSync(join(cache, made!));
    const stale = `deadbeef-12-${rest}`;
    const otherFlags = `deadbeef-12-${process.version}-${process.arch}-1234abcd-info.bin`;
    const otherCommand = `deadbeef-12-${rest.replace(/-info\.bin$/, '-map.bin')}`;
    for (const f of [stale, otherFlags, otherCommand]) writeFileSync(join(cache, f), 'old');
    expect(vmdisk(['info', image]).status).toBe(0);
    expect(files()).toEqual([made, otherFlags, otherCommand].sort());
  });

  it('is not written by a failing command, nor when turned off', () => {
    const bad = vmdisk(['info', join(dir, 'missing.qcow2')]);
    expect(bad.status).not.toBe(0);
    expect(files()).toEqual([]);
    rmSync(cache, { recursive: true });
    expect(vmdisk(['info', image], { VMDISK_CODE_CACHE: 'off' }).status).toBe(0);
    expect(() => readdirSync(cache)).toThrow();
  });

  it('is not used in a folder that others may write', () => {
    mkdirSync(cache);
    chmodSync(cache, 0o777);
    const r = vmdisk(['info', image]);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('file format: qcow2');
    expect(files()).toEqual([]);
  });
});

describe('koffi in the bundle', () => {
  it("is this platform's binary, loaded without koffi's JavaScript loader", () => {
    const bundle = CLI.replace(/cli\.js$/, 'vm-disk.cjs');
    const script = `
      const { main } = require(${JSON.stringify(bundle)});
      main(['info', ${JSON.stringify(image)}], { write() { return true; } }).then((code) => {
        const loaded = Object.keys(require.cache);
        console.log(JSON.stringify({
          code,
          binary: loaded.some((f) => f.endsWith('koffi.node')),
          loader: loaded.some((f) => /node_modules\\/koffi\\//.test(f)),
        }));
      });`;
    const out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(JSON.parse(out)).toEqual({ code: 0, binary: true, loader: false });
  });
});
