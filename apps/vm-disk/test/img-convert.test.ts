// `vm-disk convert` against `qemu-img convert`: the same invocation on the same sources
// (raw, qcow2 v2 and v3, compressed, a 3-deep chain), the same exit status and stdout,
// and targets that qemu-img finds equal, clean, described and mapped alike.
import { randomFillSync } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, run, start, waitFor } from './harness/daemon.ts';
import { infoOf, makeSources, mapOf, qemuImg, SIZE, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-convert-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs both tools with `args` (TARGET replaced by each one's target); returns the targets. */
async function both(args: string[], name: string): Promise<[string, string]> {
  const ours = join(dir, `${name}.ours`);
  const theirs = join(dir, `${name}.theirs`);
  const [a, b] = [
    await vmDisk(['convert', ...args.map((x) => (x === 'TARGET' ? ours : x))]),
    await qemuImg(['convert', ...args.map((x) => (x === 'TARGET' ? theirs : x))]),
  ];
  expect(a.stderr, 'our stderr').toBe(b.stderr.replaceAll(theirs, ours));
  expect(a.code).toBe(b.code);
  expect(a.stdout).toBe(b.stdout);
  return [ours, theirs];
}

async function sameImages(ours: string, theirs: string, format: string): Promise<void> {
  await run('qemu-img', ['compare', '-U', ours, theirs]);
  if (format === 'qcow2') await run('qemu-img', ['check', '-U', ours]);
  expect(await infoOf(ours)).toEqual(await infoOf(theirs));
}

const SOURCES = ['raw', 'qcow2v2', 'qcow2v3', 'compressed', 'chain'] as const;

describe('vm-disk convert', () => {
  describe.each(SOURCES)('from %s', (kind) => {
    it.each([
      ['raw', ['-O', 'raw']],
      ['qcow2', ['-O', 'qcow2']],
      ['qcow2 v2, 4k clusters', ['-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4k']],
      ['compressed qcow2', ['-c', '-O', 'qcow2']],
      ['qcow2, -m 16 -W', ['-m', '16', '-W', '-O', 'qcow2']],
    ])('to %s: the same image, as sparse as qemu-img makes it', async (name, opts) => {
      const format = opts.includes('raw') ? 'raw' : 'qcow2';
      const [ours, theirs] = await both(
        [...opts, src[kind], 'TARGET'],
        `${kind}-${name.replace(/\W+/g, '-')}`,
      );
      await sameImages(ours, theirs, format);
      expect(await mapOf(ours)).toEqual(await mapOf(theirs));
    });
  });

  it('-c packs compressed clusters end to end, as small as qemu-img makes them', async () => {
    // Clusters that compress to more than half a cluster (half random data): each must not
    // take a host cluster of its own.
    const raw = join(dir, 'half-random.raw');
    const buf = Buffer.alloc(4 << 20);
    for (let at = 0; at < buf.length; at += 4096) randomFillSync(buf, at, 2048);
    writeFileSync(raw, buf);
    const [ours, theirs] = await both(['-c', '-O', 'qcow2', raw, 'TARGET'], 'packed');
    await sameImages(ours, theirs, 'qcow2');
    expect(statSync(ours).size).toBeLessThanOrEqual(statSync(theirs).size * 1.02);
  });

  it('-S 0 allocates everything, as qemu-img does', async () => {
    const [ours, theirs] = await both(['-S', '0', '-O', 'qcow2', src.qcow2v3, 'TARGET'], 's0');
    await sameImages(ours, theirs, 'qcow2');
    expect(await mapOf(ours)).toEqual(await mapOf(theirs));
  });

  it('-S 64k treats shorter zero runs as data', async () => {
    const [ours, theirs] = await both(['-S', '64k', '-O', 'raw', src.raw, 'TARGET'], 's64k');
    await sameImages(ours, theirs, 'raw');
  });

  it('-B: only the top layer is copied, over the given backing file', async () => {
    const mid = join(dir, 'mid.qcow2');
    const [ours, theirs] = await both(
      ['-O', 'qcow2', '-B', mid, '-F', 'qcow2', src.chain, 'TARGET'],
      'backed',
    );
    await sameImages(ours, theirs, 'qcow2');
    expect(await mapOf(ours)).toEqual(await mapOf(theirs));
  });

  it('-n into an existing image writes its zeros (and --target-is-zero skips them)', async () => {
    for (const extra of [[], ['--target-is-zero']]) {
      const name = `existing${extra.length}`;
      for (const who of ['ours', 'theirs']) {
        await run('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          join(dir, `${name}.${who}`),
          String(SIZE),
        ]);
        await run('qemu-io', ['-c', 'write -P 0xee 0 8M', join(dir, `${name}.${who}`)]);
      }
      const [ours, theirs] = await both(
        ['-n', ...extra, '-O', 'qcow2', src.qcow2v3, 'TARGET'],
        name,
      );
      await run('qemu-img', ['check', ours]);
      expect(await mapOf(ours)).toEqual(await mapOf(theirs));
      if (extra.length === 0) await run('qemu-img', ['compare', ours, src.qcow2v3]);
    }
  });

  it.each([
    ['-c to raw', ['-c', '-O', 'raw']],
    ['--target-is-zero without -n', ['--target-is-zero', '-O', 'raw']],
    ['-m 0', ['-m', '0', '-O', 'raw']],
    ['-m 17', ['-m', '17', '-O', 'raw']],
    ['-S 1000', ['-S', '1000', '-O', 'raw']],
    ['-B to raw', ['-B', 'x', '-O', 'raw']],
    ['-t bogus', ['-t', 'bogus', '-O', 'raw']],
    ['an unknown option', ['--frob', '-O', 'raw']],
    ['-O vmdkx', ['-O', 'vmdkx']],
  ])('refuses %s with qemu-img exit status, making nothing', async (name, opts) => {
    const ours = join(dir, `refused-${name.replace(/\W+/g, '-')}.ours`);
    const theirs = join(dir, `refused-${name.replace(/\W+/g, '-')}.theirs`);
    const a = await vmDisk(['convert', ...opts, src.qcow2v3, ours]);
    const b = await qemuImg(['convert', ...opts, src.qcow2v3, theirs]);
    expect(a.code).toBe(b.code);
    expect(a.stdout).toBe(b.stdout);
    // (qemu-img makes the target before it refuses -t bogus; we refuse first.)
    expect(existsSync(ours)).toBe(false);
  });

  it('-p draws the progress on stdout, as qemu-img', async () => {
    const out = join(dir, 'progress.ours');
    const a = await vmDisk(['convert', '-p', '-O', 'raw', src.qcow2v3, out]);
    expect(a.code).toBe(0);
    expect(a.stdout.startsWith('    (0.00/100%)\r')).toBe(true);
    expect(a.stdout.endsWith('    (100.00/100%)\r\n')).toBe(true);
  });

  it('reads from and writes to NBD (nbd+unix URIs, qemu-nbd as the peer)', async () => {
    const sock = join(dir, 'src.sock');
    const server = start('qemu-nbd', ['-t', '-r', '-f', 'qcow2', '-k', sock, src.chain]);
    try {
      await waitFor('qemu-nbd socket', () => existsSync(sock));
      const out = join(dir, 'from-nbd.qcow2');
      const a = await vmDisk(['convert', '-O', 'qcow2', `nbd+unix:///?socket=${sock}`, out]);
      expect(a.stderr).toBe('');
      expect(a.code).toBe(0);
      await run('qemu-img', ['compare', '-U', out, src.chain]);
      await run('qemu-img', ['check', out]);
    } finally {
      await server.stop();
    }
    const blank = join(dir, 'nbd-target.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', blank, String(SIZE)]);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 0 8M', blank]);
    const sock2 = join(dir, 'dst.sock');
    const target = start('qemu-nbd', ['-t', '-f', 'raw', '-k', sock2, blank]);
    try {
      await waitFor('qemu-nbd socket', () => existsSync(sock2));
      const a = await vmDisk(['convert', '-n', src.compressed, `nbd+unix:///?socket=${sock2}`]);
      expect(a.stderr).toBe('');
      expect(a.code).toBe(0);
    } finally {
      await target.stop();
    }
    await run('qemu-img', ['compare', '-f', 'raw', blank, src.compressed]);
  });

  it('loads the NBD client for an NBD image only (a convert of files does not)', async () => {
    // Prints at exit whether the process imported @vmdisk/nbd (module.registerHooks sees
    // every specifier resolved). The app's `main` as an embedder imports it, from the
    // packages' ES modules: the bin's commands run the same code bundled into one script.
    const hook = `data:text/javascript,import { registerHooks } from 'node:module'; let nbd = false; registerHooks({ resolve(s, c, next) { if (s === '@vmdisk/nbd') nbd = true; return next(s, c); } }); process.on('exit', () => process.stdout.write(String(nbd)));`;
    const index = CLI.replace(/cli\.js$/, 'index.js');
    const convert = (from: string, to: string) =>
      run(process.execPath, [
        '--import',
        hook,
        '--input-type=module',
        '-e',
        `const { main } = await import(${JSON.stringify(index)}); process.exitCode = await main(${JSON.stringify(['convert', '-O', 'raw', from, to])});`,
      ]);
    expect(await convert(src.qcow2v3, join(dir, 'no-nbd.raw'))).toBe('false');
    const sock = join(dir, 'lazy.sock');
    const server = start('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', sock, src.raw]);
    try {
      await waitFor('qemu-nbd socket', () => existsSync(sock));
      expect(await convert(`nbd+unix:///?socket=${sock}`, join(dir, 'nbd.raw'))).toBe('true');
    } finally {
      await server.stop();
    }
  });

  it('--image-opts and --object name the source', async () => {
    const out = join(dir, 'image-opts.raw');
    const a = await vmDisk([
      'convert',
      '--object',
      'secret,id=sec0,data=unused',
      '--image-opts',
      `driver=qcow2,file.driver=file,file.filename=${src.qcow2v2}`,
      '-O',
      'raw',
      out,
    ]);
    expect(a.stderr).toBe('');
    expect(a.code).toBe(0);
    await run('qemu-img', ['compare', out, src.qcow2v2]);
  });
});

describe('unknown subcommands and options', () => {
  it('an unknown subcommand is named, with the known ones, and exits as qemu-img', async () => {
    const a = await vmDisk(['frobnicate', 'x']);
    const b = await qemuImg(['frobnicate', 'x']);
    expect(a.code).toBe(b.code);
    expect(a.stderr).toContain('Command not found: frobnicate');
    expect(a.stderr).toMatch(/Known commands: .*convert, compare, check/);
    expect(a.stdout).toBe(b.stdout);
  });

  it.each(['convert', 'compare', 'check'])(
    '%s: an unknown option exits as qemu-img',
    async (cmd) => {
      const a = await vmDisk([cmd, '--frob', 'a', 'b']);
      const b = await qemuImg([cmd, '--frob', 'a', 'b']);
      expect(a.code).toBe(b.code);
      expect(a.stderr).toContain("unrecognized option '--frob'");
    },
  );
});
