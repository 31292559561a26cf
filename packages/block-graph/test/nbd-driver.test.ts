// The `nbd` protocol driver against independent peers (qemu-nbd serving a qcow2, nbdkit's
// memory plugin over TCP, with its error and delay filters) and against our own NbdServer.
// Peers run as child processes on unix sockets in a temp dir or ephemeral ports and are
// always killed; images are checked afterwards with qemu-img and qemu-io.

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { MemoryTarget, NbdServer } from '@vmdisk/nbd';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { makeCertificates, qemuImgMap } from '../../../tools/test-support/src/index.ts';
import { BlockGraph } from '../src/index.ts';
import { pattern, qemuImg, tempDir, writeFile } from './helpers.ts';

const tmp = tempDir();
const KiB = 1024;
const MiB = 1 << 20;

// ---- peers ----

const peers = new Set<ChildProcess>();
const graphs = new Set<BlockGraph>();

function startPeer(cmd: string, args: string[]): ChildProcess {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  child.on('exit', () => peers.delete(child));
  (child as ChildProcess & { stderrText: () => string }).stderrText = () => stderr;
  peers.add(child);
  return child;
}

async function kill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await gone;
}

/** Waits until something accepts connections at the address (the peer is up). */
async function waitListening(
  child: ChildProcess,
  addr: { path: string } | { port: number },
): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) {
      throw new Error(
        `peer exited: ${(child as ChildProcess & { stderrText: () => string }).stderrText()}`,
      );
    }
    const ok = await new Promise<boolean>((resolve) => {
      if ('path' in addr && !existsSync(addr.path)) return resolve(false);
      const s =
        'path' in addr
          ? net.connect(addr.path)
          : net.connect({ host: '127.0.0.1', port: addr.port });
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error('peer did not start listening');
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

let seq = 0;
const uniq = (name: string) => tmp.path(`${name}-${++seq}`);

/** qemu-nbd serving an image on a unix socket (persistent, several clients). */
async function qemuNbd(
  file: string,
  format: string,
  name: string,
  extra: string[] = [],
): Promise<{ child: ChildProcess; sock: string }> {
  const sock = uniq('qemu-nbd.sock');
  const child = startPeer('qemu-nbd', [
    '-t',
    '-e',
    '8',
    '-f',
    format,
    '-k',
    sock,
    '-x',
    name,
    ...extra,
    file,
  ]);
  await waitListening(child, { path: sock });
  return { child, sock };
}

/** nbdkit on 127.0.0.1 and an ephemeral port. */
async function nbdkit(args: string[]): Promise<{ child: ChildProcess; port: number }> {
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const child = startPeer('nbdkit', [
      '-f',
      '--exit-with-parent',
      '-i',
      '127.0.0.1',
      '-p',
      String(port),
      ...args,
    ]);
    try {
      await waitListening(child, { port });
      return { child, port };
    } catch (err) {
      await kill(child);
      if (attempt >= 3) throw err;
    }
  }
}

function graph(): BlockGraph {
  const g = new BlockGraph();
  graphs.add(g);
  return g;
}

afterEach(async () => {
  for (const g of graphs) await g.close().catch(() => undefined);
  graphs.clear();
  for (const p of [...peers]) await kill(p);
});

afterAll(() => tmp.cleanup());

// ---- oracles ----

interface Run {
  start: number;
  length: number;
  hole: boolean;
  zero: boolean;
}

function merge(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (
      last &&
      last.hole === r.hole &&
      last.zero === r.zero &&
      last.start + last.length === r.start
    ) {
      last.length += r.length;
    } else out.push({ ...r });
  }
  return out;
}

/** Our block status of a whole backend as runs. */
async function ourMap(
  b: {
    blockStatus(o: number, l: number): Promise<{ length: number; hole: boolean; zero: boolean }[]>;
  },
  size: number,
): Promise<Run[]> {
  const runs: Run[] = [];
  let pos = 0;
  while (pos < size) {
    for (const e of await b.blockStatus(pos, size - pos)) {
      runs.push({ start: pos, length: e.length, hole: e.hole, zero: e.zero });
      pos += e.length;
    }
  }
  return merge(runs);
}

/** qemu-img map of a local image as runs (NBD's view: hole = no data). */
async function qemuImgRuns(file: string, format: string): Promise<Run[]> {
  const entries = await qemuImgMap(file, format);
  return merge(
    entries.map((e) => ({ start: e.start, length: e.length, hole: !e.data, zero: e.zero })),
  );
}

/** nbdinfo --map of an NBD URI as runs (type bit 0 hole, bit 1 zero). */
function nbdinfoMap(uri: string): Run[] {
  const out = execFileSync('nbdinfo', ['--map', '--json', uri], { encoding: 'utf8' });
  const entries = JSON.parse(out) as { offset: number; length: number; type: number }[];
  return merge(
    entries.map((e) => ({
      start: e.offset,
      length: e.length,
      hole: (e.type & 1) !== 0,
      zero: (e.type & 2) !== 0,
    })),
  );
}

async function readAll(
  b: { read(o: number, buf: Uint8Array): Promise<void> },
  offset: number,
  length: number,
): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await b.read(offset, buf);
  return buf;
}

// ---- 1. qemu-nbd serving a qcow2 ----

describe('nbd driver against qemu-nbd serving a qcow2', () => {
  function makeImage(): { file: string; expected: Buffer } {
    const file = uniq('remote.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, String(4 * MiB));
    execFileSync('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0xab 0 64k',
      '-c',
      'write -P 0x11 1M 192k',
      '-c',
      'write -z 1088k 64k',
      '-c',
      'write -P 0xcd 2M 4k',
      file,
    ]);
    const expected = Buffer.alloc(4 * MiB);
    expected.fill(0xab, 0, 64 * KiB);
    expected.fill(0x11, MiB, MiB + 192 * KiB);
    expected.fill(0, MiB + 64 * KiB, MiB + 128 * KiB);
    expected.fill(0xcd, 2 * MiB, 2 * MiB + 4 * KiB);
    return { file, expected };
  }

  it('reads what qemu-io wrote, writes what qemu-img reads back, block status as qemu-img map', async () => {
    const { file, expected } = makeImage();
    const { child, sock } = await qemuNbd(file, 'qcow2', 'disk0');
    const g = graph();
    await g.add({
      driver: 'raw',
      'node-name': 'remote',
      file: { driver: 'nbd', server: { type: 'unix', path: sock }, export: 'disk0' },
    });
    const b = await g.createBackend('remote', { write: true });
    expect(b.size()).toBe(4 * MiB);
    expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
    // Unaligned bytes in the middle of a cluster, across a cluster boundary.
    expect(
      (await readAll(b, MiB + 100, 5000)).equals(expected.subarray(MiB + 100, MiB + 5100)),
    ).toBe(true);

    // Block status: the same runs as qemu-img map of the image qemu-nbd serves.
    expect(await ourMap(b, 4 * MiB)).toEqual(await qemuImgRuns(file, 'qcow2'));

    // Writes (one unaligned), write-zeroes, a flush, then close and let qemu check the file.
    const w = pattern(5, 3 * MiB + 7, 70_000);
    await b.write(3 * MiB + 7, w);
    w.copy(expected, 3 * MiB + 7);
    await b.writeZeroes(0, 32 * KiB);
    expected.fill(0, 0, 32 * KiB);
    await b.flush();
    await b.close();
    await g.close();
    graphs.delete(g);
    await kill(child);
    const raw = uniq('expected.raw');
    writeFileSync(raw, expected);
    // Exit status 0: identical contents.
    qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, file);
    expect(qemuImg('check', '-q', file)).toBe('');
  });

  it('overlays the remote disk: reads fall through, writes land in the local overlay only', async () => {
    const { file, expected } = makeImage();
    const before = uniq('before.raw');
    writeFileSync(before, expected);
    const { child, sock } = await qemuNbd(file, 'qcow2', 'base', ['-r']);
    const overlay = uniq('overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', overlay, String(4 * MiB));
    const g = graph();
    await g.add({
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: overlay },
      backing: {
        driver: 'raw',
        'node-name': 'remote',
        file: {
          driver: 'nbd',
          'node-name': 'remote-proto',
          server: { type: 'unix', path: sock },
          export: 'base',
        },
      },
    });
    const b = await g.createBackend('top', { write: true });
    expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
    // A write into the middle of the remote's data: copy on write from the remote.
    const w = pattern(9, MiB + 4096, 8192);
    await b.write(MiB + 4096, w);
    w.copy(expected, MiB + 4096);
    await b.write(3 * MiB, Buffer.alloc(65536, 0x77));
    expected.fill(0x77, 3 * MiB, 3 * MiB + 65536);
    expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
    // Through the graph: the overlay's top layer holds only the two written clusters.
    // Through the graph: depth 1 (the overlay) for the two written clusters only, depth 2
    // (the remote) for the rest.
    let pos = 0;
    const top: number[][] = [];
    for (const e of await b.blockStatus(0, 4 * MiB)) {
      if (e.depth === 1) top.push([pos, e.length]);
      else expect(e.depth).toBe(2);
      pos += e.length;
    }
    expect(pos).toBe(4 * MiB);
    expect(top).toEqual([
      [MiB, 65536],
      [3 * MiB, 65536],
    ]);
    await b.close();
    await g.close();
    graphs.delete(g);

    // The remote is unchanged (checked while qemu-nbd still serves it read-only).
    qemuImg('compare', '-q', '-U', '-f', 'raw', '-F', 'qcow2', before, file);
    await kill(child);
    // The overlay alone: the two written clusters allocated, the copied-on-write remote
    // bytes and ours inside the first.
    const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', overlay)) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    const data = map.filter((e) => e.data).map((e) => [e.start, e.length]);
    expect(data).toEqual([
      [MiB, 65536],
      [3 * MiB, 65536],
    ]);
    const io = execFileSync(
      'qemu-io',
      [
        '-f',
        'qcow2',
        '-r',
        '-c',
        'read -P 0x11 1M 4k',
        '-c',
        'read -P 0x77 3M 64k',
        '-c',
        'read -P 0x11 1036k 52k',
        overlay,
      ],
      { encoding: 'utf8' },
    );
    expect(io).not.toMatch(/verification failed|error/i);
    expect(readFileSync(overlay).includes(w)).toBe(true);
    expect(qemuImg('check', '-q', overlay)).toBe('');
  });

  it('refuses write access to a read-only export unless the node is read-only', async () => {
    const { file, expected } = makeImage();
    const { sock } = await qemuNbd(file, 'qcow2', 'ro', ['-r']);
    const g = graph();
    const server = { type: 'unix', path: sock };
    await expect(
      g.add({ driver: 'nbd', 'node-name': 'w', server, export: 'ro' }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_READ_ONLY',
      message: expect.stringMatching(/read-only/),
    });
    expect(g.hasNode('w')).toBe(false);
    await g.add({ driver: 'nbd', 'node-name': 'r', server, export: 'ro', 'read-only': true });
    const b = await g.createBackend('r');
    expect((await readAll(b, 0, 64 * KiB)).equals(expected.subarray(0, 64 * KiB))).toBe(true);
    // auto-read-only falls back to read-only.
    await g.add({ driver: 'nbd', 'node-name': 'a', server, export: 'ro', 'auto-read-only': true });
    expect(g.query().find((n) => n['node-name'] === 'a')).toMatchObject({ 'read-only': true });
    await expect(g.createBackend('a', { write: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_PERMISSION_CONFLICT',
    });
  });

  it('connects with TLS (PSK) through a tls-creds-psk object', async () => {
    const { file, expected } = makeImage();
    const serverDir = uniq('psk-server');
    const clientDir = uniq('psk-client');
    const key = '0123456789abcdef0123456789abcdef';
    execFileSync('mkdir', ['-p', serverDir, clientDir]);
    writeFileSync(`${serverDir}/keys.psk`, `qemu:${key}\nalice:${'ab'.repeat(16)}\n`);
    writeFileSync(`${clientDir}/keys.psk`, `alice:${'ab'.repeat(16)}\n`);
    const { sock } = await qemuNbd(file, 'qcow2', 'secret', [
      '--object',
      `tls-creds-psk,id=tls0,endpoint=server,dir=${serverDir}`,
      '--tls-creds',
      'tls0',
    ]);
    const g = graph();
    const server = { type: 'unix', path: sock };
    // Without credentials the server refuses to go on.
    await expect(
      g.add({ driver: 'nbd', 'node-name': 'plain', server, export: 'secret' }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      message: expect.stringMatching(/TLS/),
    });
    await g.addObject({
      'qom-type': 'tls-creds-psk',
      id: 'c0',
      dir: clientDir,
      username: 'alice',
      endpoint: 'client',
    });
    await g.add({ driver: 'nbd', 'node-name': 'tls', server, export: 'secret', 'tls-creds': 'c0' });
    const b = await g.createBackend('tls', { write: true });
    expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
    expect(g.queryObjects().find((o) => o.id === 'c0')?.users).toBe(1);
    await expect(g.delObject('c0')).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_OBJECT_IN_USE',
    });
    // A server endpoint object and a missing one are option errors on tls-creds.
    await g.addObject({
      'qom-type': 'tls-creds-x509',
      id: 'srv',
      dir: clientDir,
      endpoint: 'server',
    });
    await expect(
      g.add({ driver: 'nbd', 'node-name': 'x', server, export: 'secret', 'tls-creds': 'srv' }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'tls-creds' });
    await expect(
      g.add({ driver: 'nbd', 'node-name': 'y', server, export: 'secret', 'tls-creds': 'none' }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'tls-creds' });
    await expect(
      g.addObject({ 'qom-type': 'tls-creds-psk', id: 'bad', endpoint: 'client' }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_BAD_OPTION',
      key: 'dir',
    });
  });
});

describe('nbd driver with X.509 against qemu-nbd over TCP', () => {
  it('verifies the server (and is verified) through a tls-creds-x509 object', async () => {
    const file = uniq('x509.raw');
    const data = pattern(7, 0, MiB);
    writeFile(file, data);
    const { server: serverDir, client: clientDir } = await makeCertificates(tmp.dir, 'x509');
    const port = await freePort();
    const child = startPeer('qemu-nbd', [
      '-t',
      '-e',
      '8',
      '-f',
      'raw',
      '-b',
      '127.0.0.1',
      '-p',
      String(port),
      '-x',
      'x',
      '--object',
      `tls-creds-x509,id=tls0,endpoint=server,dir=${serverDir},verify-peer=on`,
      '--tls-creds',
      'tls0',
      file,
    ]);
    await waitListening(child, { port });
    const g = graph();
    await g.addObject({
      'qom-type': 'tls-creds-x509',
      id: 'c',
      dir: clientDir,
      endpoint: 'client',
    });
    const server = { type: 'inet', host: '127.0.0.1', port: String(port) };
    await g.add({ driver: 'nbd', 'node-name': 'x', server, export: 'x', 'tls-creds': 'c' });
    const b = await g.createBackend('x', { write: true });
    expect((await readAll(b, 0, MiB)).equals(data)).toBe(true);
    const w = pattern(8, 4096, 8192);
    await b.write(4096, w);
    expect((await readAll(b, 4096, 8192)).equals(w)).toBe(true);
    // The server's certificate does not name this host: refused.
    await expect(
      g.add({ driver: 'nbd', server, export: 'x', 'tls-creds': 'c', 'tls-hostname': 'elsewhere' }),
    ).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      message: expect.stringMatching(/TLS|certificate/i),
    });
    await b.close();
    await g.close();
    graphs.delete(g);
    await kill(child);
    w.copy(data, 4096);
    expect(readFileSync(file).equals(data)).toBe(true);
  });
});

// ---- 2. nbdkit memory over TCP ----

describe('nbd driver against nbdkit over TCP', () => {
  it('writes, flushes, trims and writes zeroes (checked with qemu-img compare and nbdinfo --map)', async () => {
    const { port } = await nbdkit(['memory', String(8 * MiB)]);
    const uri = `nbd://127.0.0.1:${port}`;
    const g = graph();
    // The port as keyval gives it: a string.
    await g.add({
      driver: 'nbd',
      'node-name': 'mem',
      discard: 'unmap',
      server: { type: 'inet', host: '127.0.0.1', port: String(port) },
    });
    const b = await g.createBackend('mem', { write: true });
    expect(b.size()).toBe(8 * MiB);
    const expected = Buffer.alloc(8 * MiB);
    const a = pattern(1, 0, 2 * MiB);
    await b.write(0, a);
    a.copy(expected, 0);
    const c = pattern(2, 5 * MiB + 3, 300_001);
    await b.write(5 * MiB + 3, c);
    c.copy(expected, 5 * MiB + 3);
    await b.flush();
    expect((await readAll(b, 0, 8 * MiB)).equals(expected)).toBe(true);

    await b.trim(MiB, 512 * KiB);
    expected.fill(0, MiB, MiB + 512 * KiB); // the memory plugin reads trimmed bytes as zeros
    await b.writeZeroes(256 * KiB, 128 * KiB);
    expected.fill(0, 256 * KiB, 384 * KiB);
    await b.writeZeroes(1700 * KiB, 100 * KiB, { noHole: true });
    expected.fill(0, 1700 * KiB, 1800 * KiB);
    await b.flush();
    expect((await readAll(b, 0, 8 * MiB)).equals(expected)).toBe(true);

    // Our block status is nbdkit's as nbdinfo sees it.
    expect(await ourMap(b, 8 * MiB)).toEqual(nbdinfoMap(uri));
    const runs = await ourMap(b, 8 * MiB);
    expect(
      runs.some((r) => r.hole && r.start <= MiB && r.start + r.length >= MiB + 512 * KiB),
    ).toBe(true);
    await b.close();
    await g.close();
    graphs.delete(g);
    // An independent reader of the same server.
    const raw = uniq('mem.raw');
    writeFile(raw, expected);
    qemuImg('compare', '-q', '-f', 'raw', '-F', 'raw', raw, uri);
  });

  it('lets the generic layer emulate WRITE_ZEROES when the server has none', async () => {
    const { port } = await nbdkit(['--filter=nozero', 'memory', String(MiB)]);
    const g = graph();
    await g.add({
      driver: 'nbd',
      'node-name': 'nz',
      server: { type: 'inet', host: '127.0.0.1', port: String(port) },
    });
    const b = await g.createBackend('nz', { write: true });
    await b.write(0, Buffer.alloc(MiB, 0x5a));
    await b.writeZeroes(4096, 65536);
    const got = await readAll(b, 0, MiB);
    const expected = Buffer.alloc(MiB, 0x5a).fill(0, 4096, 4096 + 65536);
    expect(got.equals(expected)).toBe(true);
    // Fast zeroing cannot be emulated: NOT_SUPPORTED.
    await expect(b.writeZeroes(0, 4096, { fastZero: true })).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_NOT_SUPPORTED',
      errnoName: 'ENOTSUP',
    });
  });

  it("keeps the server's errno (nbdkit error filter)", async () => {
    const { port } = await nbdkit([
      '--filter=error',
      'memory',
      String(MiB),
      'error-pwrite=ENOSPC',
      'error-pwrite-rate=100%',
    ]);
    const g = graph();
    await g.add({
      driver: 'nbd',
      'node-name': 'e',
      server: { type: 'inet', host: '127.0.0.1', port: String(port) },
    });
    const b = await g.createBackend('e', { write: true });
    await expect(b.write(0, Buffer.alloc(4096, 1))).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      errnoName: 'ENOSPC',
      syscall: 'nbd',
      node: 'e',
    });
    // Reads still work on the same connection.
    expect((await readAll(b, 0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
  });
});

// ---- 4. bad options and a dying server ----

describe('nbd driver errors', () => {
  it('names the bad key', async () => {
    const g = graph();
    const bad = async (opts: Record<string, unknown>, key: string) =>
      expect(g.add({ driver: 'raw', file: { driver: 'nbd', ...opts } })).rejects.toMatchObject({
        code: 'ERR_VMDISK_BLOCK_BAD_OPTION',
        key,
      });
    await bad({}, 'file.server');
    await bad({ server: 'x' }, 'file.server');
    await bad({ server: { type: 'vsock', cid: '3', port: '1' } }, 'file.server.type');
    await bad({ server: { host: 'localhost', port: '1' } }, 'file.server.type');
    await bad({ server: { type: 'unix' } }, 'file.server.path');
    await bad({ server: { type: 'inet', port: '10809' } }, 'file.server.host');
    await bad({ server: { type: 'inet', host: 'h' } }, 'file.server.port');
    await bad({ server: { type: 'inet', host: 'h', port: 'http' } }, 'file.server.port');
    await bad({ server: { type: 'inet', host: 'h', port: '70000' } }, 'file.server.port');
    await bad({ server: { type: 'unix', path: '/x', host: 'h' } }, 'file.server.host');
    await bad({ server: { type: 'unix', path: '/x' }, export: 3 }, 'file.export');
    await bad(
      { server: { type: 'unix', path: '/x' }, 'reconnect-delay': 1 },
      'file.reconnect-delay',
    );
    expect(g.query()).toEqual([]);
  });

  it('fails clearly for a missing export or an unreachable server', async () => {
    const file = uniq('small.raw');
    writeFile(file, Buffer.alloc(MiB));
    const { sock } = await qemuNbd(file, 'raw', 'there');
    const g = graph();
    const err = await g
      .add({ driver: 'nbd', server: { type: 'unix', path: sock }, export: 'not-there' })
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_BAD_OPTION', key: 'export' });
    expect((err as Error).message).toMatch(/not-there/);
    await expect(
      g.add({ driver: 'nbd', server: { type: 'unix', path: uniq('nobody.sock') } }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'ENOENT' });
    const port = await freePort();
    await expect(
      g.add({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: String(port) } }),
    ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'ECONNREFUSED' });
    // A server that accepts and never says a word: open-timeout (seconds).
    const muted = new Set<net.Socket>();
    const mute = net.createServer((s) => muted.add(s));
    await new Promise<void>((resolve) => mute.listen(0, '127.0.0.1', resolve));
    try {
      const mutePort = (mute.address() as net.AddressInfo).port;
      await expect(
        g.add({
          driver: 'nbd',
          server: { type: 'inet', host: '127.0.0.1', port: String(mutePort) },
          'open-timeout': 1,
        }),
      ).rejects.toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'ETIMEDOUT' });
    } finally {
      for (const s of muted) s.destroy();
      await new Promise((resolve) => mute.close(resolve));
    }
    expect(g.query()).toEqual([]);
  });

  it('fails the request of a server that dies mid-request; the rest of the graph goes on', async () => {
    const { child, port } = await nbdkit([
      '--filter=delay',
      'memory',
      String(MiB),
      'delay-read=60',
    ]);
    const g = graph();
    await g.add({
      driver: 'nbd',
      'node-name': 'dying',
      server: { type: 'inet', host: '127.0.0.1', port: String(port) },
    });
    const other = uniq('other.raw');
    writeFile(other, pattern(3, 0, MiB));
    await g.add({ driver: 'raw', 'node-name': 'local', file: { driver: 'file', filename: other } });
    const b = await g.createBackend('dying', { write: true });
    const local = await g.createBackend('local');
    await b.write(0, Buffer.alloc(4096, 1)); // writes are not delayed
    const pending = b.read(0, Buffer.alloc(4096)).then(
      () => null,
      (e: unknown) => e,
    );
    // The read is on the wire (the server sleeps on it); kill the server under it.
    await new Promise((r) => setTimeout(r, 200));
    await kill(child);
    const err = await pending;
    expect(err).toMatchObject({ code: 'ERR_VMDISK_BLOCK_IO', errnoName: 'EIO', syscall: 'nbd' });
    // Later requests fail the same way, on the caller's promise.
    await expect(b.write(0, Buffer.alloc(4096))).rejects.toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      errnoName: 'EIO',
    });
    // The other node is served, and the dead one can be removed.
    expect((await readAll(local, 0, MiB)).equals(pattern(3, 0, MiB))).toBe(true);
    await b.close();
    await g.del('dying');
    expect(g.hasNode('dying')).toBe(false);
    expect((await readAll(local, 4096, 4096)).equals(pattern(3, 4096, 4096))).toBe(true);
  });
});

// ---- 5. our own server ----

describe('nbd driver against our NbdServer', () => {
  it('walks block status one reply at a time, not one request per extent; a write drops what a reply said', async () => {
    const server = new NbdServer();
    const g = graph();
    try {
      const sock = uniq('walk.sock');
      await server.listen({ path: sock });
      const target = new MemoryTarget(4 * MiB);
      // 32 runs: 64 KiB of data every other 64 KiB.
      for (let at = 0; at < 4 * MiB; at += 128 * KiB)
        await target.write(at, pattern(1, at, 64 * KiB), {});
      // The requests the server answers: the target's blockStatus calls, counted.
      let asked = 0;
      const blockStatus = target.blockStatus.bind(target);
      target.blockStatus = (offset, length) => {
        asked++;
        return blockStatus(offset, length);
      };
      server.addExport({ name: 'walk', target, writable: true });
      await g.add({
        driver: 'nbd',
        'node-name': 'walk',
        server: { type: 'unix', path: sock },
        export: 'walk',
      });
      const b = await g.createBackend('walk', { write: true, maxExtents: 1000 });
      const expected = Array.from({ length: 64 }, (_, i) => ({
        length: 64 * KiB,
        hole: i % 2 === 1,
        zero: i % 2 === 1,
        depth: 1,
      }));
      expect(await b.blockStatus(0, 4 * MiB)).toEqual(expected);
      expect(asked).toBe(1);
      // A call that does not continue the walk asks the server again.
      expect(await b.blockStatus(32 * KiB, 64 * KiB)).toEqual([
        { length: 32 * KiB, hole: false, zero: false, depth: 1 },
        { length: 32 * KiB, hole: true, zero: true, depth: 1 },
      ]);
      expect(asked).toBe(2);
      // The walk's next call would continue from the kept rest of the reply; a write in
      // between drops it, and the answer is the server's new one.
      asked = 0;
      expect(await b.blockStatus(0, 64 * KiB)).toEqual([expected[0]]);
      await b.write(64 * KiB, pattern(2, 0, 64 * KiB));
      expect(await b.blockStatus(64 * KiB, 64 * KiB)).toEqual([
        { length: 64 * KiB, hole: false, zero: false, depth: 1 },
      ]);
      expect(asked).toBe(2);
      await b.close();
    } finally {
      await g.close();
      graphs.delete(g);
      await server.close();
    }
  });

  it('round-trips through a MemoryTarget, honouring the block size constraints', async () => {
    const server = new NbdServer();
    const g = graph();
    try {
      const sock = uniq('ours.sock');
      await server.listen({ path: sock });
      const target = new MemoryTarget(4 * MiB);
      server.addExport({
        name: 'mem',
        target,
        writable: true,
        blockSize: { minimum: 4096, preferred: 4096, maximum: 65536 },
      });
      await g.add({
        driver: 'nbd',
        'node-name': 'ours',
        discard: 'unmap',
        server: { type: 'unix', path: sock },
        export: 'mem',
      });
      const info = g.query().find((n) => n['node-name'] === 'ours');
      expect(info).toMatchObject({ driver: 'nbd', server: sock, export: 'mem', size: 4 * MiB });
      const b = await g.createBackend('ours', { write: true });
      const expected = Buffer.alloc(4 * MiB);
      // Unaligned and larger than the maximum: read-modify-write and splitting by the
      // generic layer (the client refuses requests that break the constraints).
      const w = pattern(4, 100, 300_000);
      await b.write(100, w);
      w.copy(expected, 100);
      expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
      const direct = Buffer.alloc(300_000);
      await target.read(100, direct);
      expect(direct.equals(w)).toBe(true);
      // NO_HOLE when the range must stay allocated, a hole when it may be unmapped.
      await b.writeZeroes(65536, 65536, { noHole: true });
      await b.writeZeroes(131072, 65536);
      expected.fill(0, 65536, 196608);
      expect(await b.blockStatus(65536, 65536)).toEqual([
        { length: 65536, hole: false, zero: true, depth: 1 },
      ]);
      expect(await b.blockStatus(131072, 65536)).toEqual([
        { length: 65536, hole: true, zero: true, depth: 1 },
      ]);
      await b.trim(2 * MiB, MiB);
      await b.flush();
      expect((await readAll(b, 0, 4 * MiB)).equals(expected)).toBe(true);
      // Block status from what the target holds: data at the start, holes from 2 MiB on.
      const runs = await ourMap(b, 4 * MiB);
      expect(runs[0]).toMatchObject({ start: 0, hole: false, zero: false });
      expect(runs[runs.length - 1]).toMatchObject({ hole: true, zero: true });
      expect(runs[runs.length - 1]!.start).toBeLessThanOrEqual(2 * MiB);
      await b.close();
    } finally {
      // The graph (the client) closes first: a clean disconnect before the server goes.
      await g.close();
      graphs.delete(g);
      await server.close();
    }
  });
});
