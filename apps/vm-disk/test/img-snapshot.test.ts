// `vm-disk snapshot` against `qemu-img snapshot`: the same steps by each tool on copies of
// the same images give the same output, exit statuses and images (qemu-img info, check,
// compare, and each snapshot as qemu-img reads it); snapshots one tool made the other
// applies and deletes.
import { closeSync, copyFileSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from './harness/daemon.ts';
import { makeSources, qemuImg, type Sources, vmDisk } from './harness/img.ts';

let dir: string;
let src: Sources;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmdisk-snapshot-'));
  src = await makeSources(dir);
}, 60_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Dates (the wall clock of each run) blanked; qemu-img's name for itself ours. */
const norm = (text: string, path: string, as: string) =>
  text
    .replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE')
    .replaceAll('qemu-img', 'vm-disk')
    .replaceAll(path, as);

/** qemu-img info without the dates of the snapshots and what differs between files. */
async function info(path: string): Promise<Record<string, unknown>> {
  const o = JSON.parse(await run('qemu-img', ['info', '--output=json', '-U', path]));
  delete o.filename;
  delete o['actual-size'];
  for (const sn of o.snapshots ?? []) {
    delete sn['date-sec'];
    delete sn['date-nsec'];
  }
  return o;
}

/** Each snapshot (and the active disk) reads the same in both images. */
async function sameSnapshots(ours: string, theirs: string, names: string[]): Promise<void> {
  for (const name of names) {
    const [a, b] = [`${ours}.${name}.raw`, `${theirs}.${name}.raw`];
    const l = ['-l', `snapshot.name=${name}`];
    await run('qemu-img', ['convert', '-U', ...l, '-O', 'raw', ours, a]);
    await run('qemu-img', ['convert', '-U', ...l, '-O', 'raw', theirs, b]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  }
  await run('qemu-img', ['compare', '-U', ours, theirs]);
}

async function clean(path: string): Promise<void> {
  const c = await qemuImg(['check', path]);
  expect(c.stdout).toContain('No errors were found on the image.');
  expect(c.code).toBe(0);
}

const io = (path: string, cmd: string) => run('qemu-io', ['-f', 'qcow2', '-c', cmd, path]);

describe('vm-disk snapshot', () => {
  describe.each(['qcow2v2', 'qcow2v3', 'compressed', 'chain'] as const)('%s', (kind) => {
    it('creates, lists, applies and deletes as qemu-img', async () => {
      const ours = join(dir, `${kind}.ours`);
      const theirs = join(dir, `${kind}.theirs`);
      copyFileSync(src[kind], ours);
      copyFileSync(src[kind], theirs);
      const step = async (args: string[]) => {
        const a = await vmDisk(['snapshot', ...args, ours]);
        const b = await qemuImg(['snapshot', ...args, theirs]);
        expect(
          { code: a.code, stdout: norm(a.stdout, ours, 'X'), stderr: norm(a.stderr, ours, 'X') },
          args.join(' '),
        ).toEqual({
          code: b.code,
          stdout: norm(b.stdout, theirs, 'X'),
          stderr: norm(b.stderr, theirs, 'X'),
        });
      };
      const write = async (cmd: string) => {
        await io(ours, cmd);
        await io(theirs, cmd);
      };
      await step(['-c', 's1']);
      await write('write -P 0x91 0 64k');
      await step(['-c', 's2']);
      await write('write -P 0x92 1M 2M');
      await step(['-c', 's1']); // names need not be unique
      await step(['-l']);
      await clean(ours);
      // What qemu-img lists of our image is what we list of it.
      const listed = await vmDisk(['snapshot', '-l', ours]);
      expect(listed.stdout).toBe((await qemuImg(['snapshot', '-l', ours])).stdout);
      await sameSnapshots(ours, theirs, ['s2']);
      await step(['-a', 's2']);
      await step(['-a', '1']);
      await step(['-d', 's1']); // the first of that name
      await step(['-d', '2']); // -d takes names only
      await step(['-l']);
      await clean(ours);
      await sameSnapshots(ours, theirs, ['s1', 's2']);
      expect(await info(ours)).toEqual(await info(theirs));
      await step(['-d', 's2']);
      await step(['-d', 's1']);
      await step(['-l']);
      await clean(ours);
      await sameSnapshots(ours, theirs, []);
      expect(await info(ours)).toEqual(await info(theirs));
    }, 180_000);
  });

  it("applies and deletes qemu-img's snapshots; qemu-img applies and deletes ours", async () => {
    const a = join(dir, 'cross-a.qcow2');
    const b = join(dir, 'cross-b.qcow2');
    copyFileSync(src.qcow2v3, a);
    copyFileSync(src.qcow2v3, b);
    const before = join(dir, 'cross-before.raw');
    await run('qemu-img', ['convert', '-O', 'raw', a, before]);
    await run('qemu-img', ['snapshot', '-c', 'q', a]);
    expect((await vmDisk(['snapshot', '-c', 'v', b])).code).toBe(0);
    await io(a, 'write -P 0xa1 0 4M');
    await io(b, 'write -P 0xa1 0 4M');
    expect((await vmDisk(['snapshot', '-a', 'q', a])).code).toBe(0);
    await run('qemu-img', ['snapshot', '-a', 'v', b]);
    await clean(a);
    await clean(b);
    await run('qemu-img', ['compare', '-F', 'raw', a, before]);
    await run('qemu-img', ['compare', '-F', 'raw', b, before]);
    expect((await vmDisk(['snapshot', '-d', 'q', a])).code).toBe(0);
    await run('qemu-img', ['snapshot', '-d', 'v', b]);
    await clean(a);
    await clean(b);
    expect((await qemuImg(['snapshot', '-l', a])).stdout).toBe('');
    expect((await qemuImg(['snapshot', '-l', b])).stdout).toBe('');
  });

  it("applies a snapshot whose L1 table is larger than the image's: as qemu-img", async () => {
    // Taken at 256k (8 L1 entries of 512-byte clusters); the image then shrunk to 32k and
    // its header's L1 table cut to the one entry 32k needs (a valid image QEMU opens).
    const ours = join(dir, 'l1-ours.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', ours, '32k']);
    await io(ours, 'write -P 3 0 32k');
    await run('qemu-img', ['resize', '-q', ours, '256k']);
    await io(ours, 'write -P 4 100k 8k');
    await run('qemu-img', ['snapshot', '-c', 'big', ours]);
    await run('qemu-img', ['resize', '-q', '--shrink', ours, '32k']);
    const fd = openSync(ours, 'r+');
    const l1Size = Buffer.alloc(4);
    l1Size.writeUInt32BE(1);
    writeSync(fd, l1Size, 0, 4, 36);
    closeSync(fd);
    await clean(ours);
    const theirs = join(dir, 'l1-theirs.qcow2');
    copyFileSync(ours, theirs);
    const a = await vmDisk(['snapshot', '-a', 'big', ours]);
    const b = await qemuImg(['snapshot', '-a', 'big', theirs]);
    expect(a.code, a.stderr).toBe(b.code);
    await clean(ours);
    await sameSnapshots(ours, theirs, ['big']);
    expect(await info(ours)).toEqual(await info(theirs));
  }, 60_000);

  it.each([
    ['apply of a missing snapshot', ['-a', 'nope']],
    ['delete of a missing snapshot', ['-d', 'nope']],
    ['two actions', ['-l', '-c', 'x']],
    ['no action', []],
    ['-U with -c', ['-U', '-c', 'x']],
    ['an unknown option', ['-x']],
  ])('%s: as qemu-img', async (name, args) => {
    const base = join(dir, `refused-${name.replace(/\W+/g, '-')}`);
    const [ours, theirs] = [`${base}.ours`, `${base}.theirs`];
    copyFileSync(src.qcow2v3, ours);
    copyFileSync(src.qcow2v3, theirs);
    const a = await vmDisk(['snapshot', ...args, ours]);
    const b = await qemuImg(['snapshot', ...args, theirs]);
    expect({ code: a.code, stdout: a.stdout, stderr: norm(a.stderr, ours, 'X') }).toEqual({
      code: b.code,
      stdout: b.stdout,
      stderr: norm(b.stderr, theirs, 'X'),
    });
  });

  it('an option without its argument: as qemu-img', async () => {
    const a = await vmDisk(['snapshot', src.qcow2v3, '-a']);
    const b = await qemuImg(['snapshot', src.qcow2v3, '-a']);
    expect({ code: a.code, stderr: norm(a.stderr, '', '') }).toEqual({
      code: b.code,
      stderr: norm(b.stderr, '', ''),
    });
  });

  it.each([
    ['-l', ['-l']],
    ['-c', ['-c', 'x']],
    ['-a', ['-a', 'x']],
    ['-d', ['-d', 'x']],
  ])('a raw image: %s as qemu-img', async (_name, args) => {
    const a = await vmDisk(['snapshot', ...args, src.raw]);
    const b = await qemuImg(['snapshot', ...args, src.raw]);
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    // (qemu-img warns that it probed raw first.)
    expect(norm(a.stderr, '', '')).toBe(
      norm(b.stderr, '', '')
        .split('\n')
        .filter((l) => !/^(WARNING|\s)/.test(l))
        .join('\n'),
    );
  });
});
