// The server against independent peers started as child processes on 127.0.0.1:
// qemu-io, qemu-img convert/compare, nbdinfo --list/--map, nbdcopy + cmp, fio's nbd
// engine with verify, and 64 clients at once.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ExportTarget, FileTarget, MemoryTarget } from '../src/index.ts';
import { run, type Started, startServer, tempDir } from './server-helpers.ts';

const MiB = 1024 * 1024;

// Both ways of reading the sockets: into the server's own buffers (dupFd, as vm-disk runs
// it) and into Node's (an embedder without dupFd).
describe.each([
  ['its own buffers', {}],
  ["Node's buffers", { dupFd: undefined }],
])('NbdServer against qemu, libnbd and fio, reading sockets into %s', (_, options) => {
  let s: Started;
  let mem: MemoryTarget;
  let file: FileTarget;
  const tmp = tempDir();
  const fileImage = join(tmp.dir, 'file.img');

  beforeAll(async () => {
    mem = new MemoryTarget(32 * MiB);
    writeFileSync(fileImage, Buffer.alloc(0));
    expect((await run('qemu-img', ['create', '-f', 'raw', fileImage, '16M'])).code).toBe(0);
    file = await FileTarget.open(fileImage);
    s = await startServer(
      [
        { name: 'mem', description: 'memory export', target: mem, writable: true },
        { name: 'file', description: 'file export', target: file, writable: true },
      ],
      options,
    );
  });
  afterAll(async () => {
    await s.server.close();
    await file.close();
    tmp.cleanup();
  });

  it('qemu-io: patterned writes, reads, zero writes and discards', async () => {
    const r = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 0 64k',
      '-c',
      'write -P 0xcd 1M 300k',
      '-c',
      'write -P 0xef 3M 4k',
      '-c',
      'write -z 3M 4k',
      '-c',
      'write -P 0x11 8M 128k',
      '-c',
      'discard 8M 64k',
      '-c',
      'read -P 0xab 0 64k',
      '-c',
      'read -P 0xcd 1M 300k',
      '-c',
      'read -P 0 3M 4k',
      '-c',
      'read -P 0 8M 64k',
      '-c',
      'read -P 0x11 8256k 64k',
      '-c',
      'flush',
      s.uri('mem'),
    ]);
    expect(r.stderr + r.stdout).not.toMatch(/fail|error/i);
    expect(r.code).toBe(0);
    // What the server's target holds, checked directly.
    const b = Buffer.alloc(300 * 1024);
    await mem.read(MiB, b);
    expect(b.every((x) => x === 0xcd)).toBe(true);
    // And a mismatch is reported (the check can fail).
    const bad = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x99 0 4k', s.uri('mem')]);
    expect(bad.stdout + bad.stderr).toMatch(/Pattern verification failed/);
  });

  it('qemu-img convert into the export and qemu-img compare against it', async () => {
    const src = join(tmp.dir, 'src.img');
    expect((await run('qemu-img', ['create', '-f', 'raw', src, '16M'])).code).toBe(0);
    const w = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x5a 0 1M',
      '-c',
      'write -P 0x3c 5M 2M',
      '-c',
      'write -P 0x77 15M 1M',
      src,
    ]);
    expect(w.code).toBe(0);
    const conv = await run('qemu-img', [
      'convert',
      '-n',
      '-f',
      'raw',
      '-O',
      'raw',
      src,
      s.uri('file'),
    ]);
    expect(conv.stderr).toBe('');
    expect(conv.code).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri('file')]);
    expect(cmp.stdout).toMatch(/Images are identical/);
    expect(cmp.code).toBe(0);
    // The bytes are in the file behind the FileTarget.
    expect(readFileSync(fileImage).equals(readFileSync(src))).toBe(true);
    await file.write!(6 * MiB, Buffer.from([1]), {});
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri('file')]);
    expect(differ.code).toBe(1);
  });

  it('nbdinfo --list shows every export with its description', async () => {
    const r = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${s.port}/`]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/export="mem":[\s\S]*description: memory export/);
    expect(r.stdout).toMatch(/export="file":[\s\S]*description: file export/);
    expect(r.stdout).toMatch(/base:allocation/);
  });

  it('nbdinfo --map matches the target allocation', async () => {
    const target = new MemoryTarget(8 * MiB);
    await target.write(MiB, Buffer.alloc(200 * 1024, 7), {});
    await target.write(5 * MiB, Buffer.alloc(64 * 1024, 9), {});
    await target.writeZeroes(5 * MiB, 4096, { noHole: true });
    s.server.addExport({ name: 'map', target });
    const r = await run('nbdinfo', ['--map', '--json', s.uri('map')]);
    expect(r.code).toBe(0);
    const got = (
      JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>
    ).map((e) => [e.offset, e.length, e.type]);
    const want: number[][] = [];
    let pos = 0;
    for (const e of await target.blockStatus(0, target.size())) {
      want.push([pos, e.length, (e.hole ? 1 : 0) | (e.zero ? 2 : 0)]);
      pos += e.length;
    }
    expect(got).toEqual(want);
    expect(want.length).toBeGreaterThanOrEqual(5);
    await s.server.removeExport('map', 'hard');
  });

  it('nbdinfo --map=qemu:allocation-depth shows the depth a target reports', async () => {
    const top = new MemoryTarget(4 * MiB);
    await top.write(0, Buffer.alloc(MiB, 1), {});
    const layered: ExportTarget = {
      size: () => top.size(),
      read: (o, b) => top.read(o, b),
      reportsDepth: true,
      // Allocated data in the top layer (1); the rest comes from a backing layer (2)
      // for the second MiB and is unallocated (0) beyond.
      blockStatus: async (o, l) => {
        const out = [];
        let pos = o;
        for (const e of await top.blockStatus(o, l)) {
          const end = pos + e.length;
          if (!e.hole) out.push({ ...e, depth: 1 });
          else {
            const split = Math.min(Math.max(pos, 2 * MiB), end);
            if (split > pos) out.push({ ...e, length: split - pos, depth: 2 });
            if (end > split) out.push({ ...e, length: end - split, depth: 0 });
          }
          pos = end;
        }
        return out;
      },
    };
    s.server.addExport({ name: 'layers', target: layered });
    const r = await run('nbdinfo', ['--map=qemu:allocation-depth', '--json', s.uri('layers')]);
    expect(r.code).toBe(0);
    const got = (
      JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>
    ).map((e) => [e.offset, e.length, e.type]);
    expect(got).toEqual([
      [0, MiB, 1],
      [MiB, MiB, 2],
      [2 * MiB, 2 * MiB, 0],
    ]);
    await s.server.removeExport('layers', 'hard');
  });

  it('qemu-io over a unix socket listener', async () => {
    const path = join(tmp.dir, 'nbd.sock');
    await s.server.listen({ path });
    const r = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x44 2M 64k',
      '-c',
      'read -P 0x44 2M 64k',
      `nbd+unix:///mem?socket=${path}`,
    ]);
    expect(r.stdout + r.stderr).not.toMatch(/fail|error/i);
    expect(r.code).toBe(0);
  });

  it('nbdcopy of a whole export, then cmp', async () => {
    await mem.write(20 * MiB, Buffer.alloc(3 * MiB, 0x42), {});
    const out = join(tmp.dir, 'copy.img');
    const r = await run('nbdcopy', [s.uri('mem'), out]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const expected = Buffer.alloc(mem.size());
    await mem.read(0, expected);
    const expectedFile = join(tmp.dir, 'expected.img');
    writeFileSync(expectedFile, expected);
    expect((await run('cmp', [out, expectedFile])).code).toBe(0);
    await mem.write(31 * MiB, Buffer.from([0xff]), {});
    expected[31 * MiB] = 0xff;
    writeFileSync(expectedFile, expected);
    expect((await run('cmp', [out, expectedFile])).code).toBe(1);
  });

  it('fio --ioengine=nbd random writes with verify', async () => {
    const r = await run('fio', [
      '--name=verify',
      '--ioengine=nbd',
      `--uri=${s.uri('mem')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--size=8M',
      '--iodepth=16',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
      '--verify_state_save=0',
      '--output-format=json',
    ]);
    expect(r.code).toBe(0);
    const job = (
      JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as {
        jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }>;
      }
    ).jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(8 * MiB);
    expect(job.read.io_bytes).toBe(8 * MiB);
  });

  it('64 clients at once (qemu-io processes), each on its own region', async () => {
    const runs = Array.from({ length: 64 }, (_, i) => {
      const off = `${i * 256}k`;
      const p = `0x${(i + 1).toString(16)}`;
      return run('qemu-io', [
        '-f',
        'raw',
        '-c',
        `write -P ${p} ${off} 256k`,
        '-c',
        `read -P ${p} ${off} 256k`,
        s.uri('mem'),
      ]);
    });
    const results = await Promise.all(runs);
    for (const r of results) {
      expect(r.code).toBe(0);
      expect(r.stdout + r.stderr).not.toMatch(/fail/i);
    }
    for (let i = 0; i < 64; i++) {
      const b = Buffer.alloc(256 * 1024);
      await mem.read(i * 256 * 1024, b);
      expect(b.every((x) => x === i + 1)).toBe(true);
    }
    expect(s.server.exportStats('mem').inFlight).toBe(0);
  });
});
