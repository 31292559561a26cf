// Our client against nbdkit (memory, data, file plugins and the error, delay filters).

import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  NbdClient,
  NbdCommandError,
  NbdConnectionError,
  NbdError,
  NbdOptionError,
} from '../src/index.ts';
import { pattern, run, usePeers } from './client-peers.ts';

const MiB = 1024 * 1024;

describe('NbdClient against nbdkit', () => {
  const t = usePeers();
  const serve = t.nbdkit;
  const { connect } = t;

  it('negotiates with the memory plugin and reads back what it wrote', async () => {
    const p = await serve(['memory', '4M']);
    const c = await connect({ path: p.socket! });
    expect(c.size).toBe(4 * MiB);
    expect(c.handshake).toBe('fixed-newstyle');
    expect(c.structuredReplies).toBe(true);
    expect(c.readOnly).toBe(false);
    expect(c.canFlush).toBe(true);
    expect(c.canTrim).toBe(true);
    expect(c.canWriteZeroes).toBe(true);
    expect(c.metaContexts).toEqual(['base:allocation']);

    const data = pattern(256 * 1024, 1);
    await c.write(64 * 1024, data);
    await c.flush();
    const back = await c.read(64 * 1024, data.length);
    expect(Buffer.from(back).equals(data)).toBe(true);
    // Unwritten space reads as zeros (an OFFSET_HOLE chunk or zero data).
    const zeros = await c.read(2 * MiB, 128 * 1024);
    expect(zeros.every((b) => b === 0)).toBe(true);
    await c.close();
    expect(await c.closed).toBeUndefined();
  });

  it('keeps many requests in flight and matches every reply by cookie', async () => {
    const p = await serve(['memory', '8M']);
    const c = await connect(`nbd+unix:///?socket=${p.socket!}`);
    const block = 32 * 1024;
    const count = 128;
    const writes: Promise<void>[] = [];
    for (let i = 0; i < count; i++) writes.push(c.write(i * block, pattern(block, i + 7)));
    expect(c.inFlight).toBeGreaterThan(1);
    await Promise.all(writes);
    // Reads in a shuffled order, all at once, each checked against its own pattern.
    const order = Array.from({ length: count }, (_, i) => (i * 37) % count);
    const reads = order.map((i) => c.read(i * block, block).then((b) => ({ i, b })));
    for (const { i, b } of await Promise.all(reads)) {
      expect(Buffer.from(b).equals(pattern(block, i + 7))).toBe(true);
    }
    await c.close();
  });

  it('queues requests beyond maxInFlight and sends them as replies come', async () => {
    const p = await serve(['memory', '4M']);
    const c = await connect({ path: p.socket! }, { maxInFlight: 4 });
    const block = 16 * 1024;
    const writes = Array.from({ length: 64 }, (_, i) => c.write(i * block, pattern(block, 50 + i)));
    expect(c.inFlight).toBe(4);
    expect(c.queued).toBe(60);
    await Promise.all(writes);
    expect(c.inFlight + c.queued).toBe(0);
    const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => c.read(i * block, block)));
    reads.forEach((b, i) => {
      expect(Buffer.from(b).equals(pattern(block, 50 + i))).toBe(true);
    });
    // close() lets queued requests go first, then disconnects.
    const last = Array.from({ length: 16 }, (_, i) => c.read(i * block, block));
    const closing = c.close();
    expect((await Promise.all(last)).length).toBe(16);
    await closing;
    expect(await c.closed).toBeUndefined();
  });

  it('trims and writes zeroes, and block status shows the holes', async () => {
    const p = await serve(['memory', '4M']);
    const c = await connect({ path: p.socket! });
    await c.write(0, Buffer.alloc(2 * MiB, 0xaa));
    let st = (await c.blockStatus(0, 4 * MiB)).get('base:allocation')!;
    expect(st[0]).toMatchObject({ hole: false, zero: false });
    expect(st[0]!.length).toBe(2 * MiB);

    await c.trim(0, 1 * MiB);
    await c.writeZeroes(1 * MiB, 512 * 1024);
    const back = await c.read(0, 2 * MiB);
    expect(back.subarray(0, 1.5 * MiB).every((b) => b === 0)).toBe(true);
    expect(back.subarray(1.5 * MiB).every((b) => b === 0xaa)).toBe(true);

    st = (await c.blockStatus(0, 4 * MiB)).get('base:allocation')!;
    expect(st.reduce((s, e) => s + e.length, 0)).toBeGreaterThanOrEqual(4 * MiB);
    expect(st[0]).toMatchObject({ hole: true, zero: true });
    // Data again from 1.5 MiB to 2 MiB, then a hole to the end.
    let at = 0;
    for (const e of st) {
      const data = at >= 1.5 * MiB && at < 2 * MiB;
      expect({ at, hole: e.hole }).toEqual({ at, hole: !data });
      at += e.length;
    }
    const one = (await c.blockStatus(0, 4 * MiB, { reqOne: true })).get('base:allocation')!;
    expect(one).toHaveLength(1);
    await c.close();
  });

  it('maps a sparse-random export exactly as nbdinfo --map does', async () => {
    const p = await serve(['sparse-random', 'size=8M', 'seed=3', 'percent=30', 'runlength=65536']);
    const c = await connect({ path: p.socket! });
    const ours: [number, number, number][] = [];
    let at = 0;
    while (at < c.size) {
      for (const e of (await c.blockStatus(at, c.size - at)).get('base:allocation')!) {
        const length = Math.min(e.length, c.size - at);
        const last = ours[ours.length - 1];
        if (last && last[2] === e.flags) last[1] += length;
        else ours.push([at, length, e.flags]);
        at += length;
        if (at >= c.size) break;
      }
    }
    const { stdout } = await run('nbdinfo', ['--map', `nbd+unix:///?socket=${p.socket!}`]);
    const theirs: [number, number, number][] = [];
    for (const line of stdout.trim().split('\n')) {
      const [start, length, type] = line.trim().split(/\s+/).map(Number) as [
        number,
        number,
        number,
      ];
      const last = theirs[theirs.length - 1];
      if (last && last[2] === type) last[1] += length;
      else theirs.push([start, length, type]);
    }
    expect(ours).toEqual(theirs);
    expect(ours.length).toBeGreaterThan(10);
    // Data reads as data, holes as zeros.
    const [hs, hl] = ours.find((r) => r[2] === 3)!;
    expect((await c.read(hs, hl)).every((b) => b === 0)).toBe(true);
    const [ds, dl] = ours.find((r) => r[2] === 0)!;
    expect((await c.read(ds, dl)).some((b) => b !== 0)).toBe(true);
    await c.close();
  });

  it('maps server errors to NbdCommandError with the errno name and keeps serving', async () => {
    const p = await serve([
      '--filter=error',
      'memory',
      '1M',
      'error-pwrite=ENOSPC',
      'error-pwrite-rate=1',
      'error-pread=EIO',
      'error-pread-rate=1',
      'error-trim=EPERM',
      'error-trim-rate=1',
    ]);
    const c = await connect({ path: p.socket! });
    const w = await c.write(0, Buffer.alloc(4096, 1)).catch((e: unknown) => e);
    expect(w).toBeInstanceOf(NbdCommandError);
    expect(w).toMatchObject({
      code: 'ERR_VMDISK_NBD_COMMAND_FAILED',
      errnoName: 'ENOSPC',
      errno: 28,
      command: 'WRITE',
      offset: 0,
      length: 4096,
    });
    const r = await c.read(8192, 4096).catch((e: unknown) => e);
    expect(r).toMatchObject({
      code: 'ERR_VMDISK_NBD_COMMAND_FAILED',
      errnoName: 'EIO',
      command: 'READ',
    });
    const t = await c.trim(0, 4096).catch((e: unknown) => e);
    expect(t).toMatchObject({ errnoName: 'EPERM', command: 'TRIM' });
    // The connection is still good after errors.
    await c.flush();
    await c.writeZeroes(0, 4096);
    expect(c.inFlight).toBe(0);
    await c.close();
  });

  it('fails every pending request at once when the server dies mid-request', async () => {
    const p = await serve(['--filter=delay', 'memory', '1M', 'delay-read=60']);
    const c = await connect({ path: p.socket! }, { maxInFlight: 6 });
    const reads = Array.from({ length: 8 }, (_, i) =>
      c.read(i * 4096, 4096).then(
        () => 'resolved',
        (e: unknown) => e,
      ),
    );
    expect(c.inFlight).toBe(6);
    expect(c.queued).toBe(2);
    // Let the requests reach the server, then kill it.
    await new Promise((r) => setTimeout(r, 100));
    await p.stop('SIGKILL');
    const results = await Promise.all(reads);
    for (const e of results) {
      expect(e).toBeInstanceOf(NbdConnectionError);
      expect(e).toMatchObject({ code: 'ERR_VMDISK_NBD_CONNECTION_LOST' });
    }
    expect(c.inFlight + c.queued).toBe(0);
    expect(await c.closed).toMatchObject({ code: 'ERR_VMDISK_NBD_CONNECTION_LOST' });
    // Later requests fail at once with the same clear error.
    await expect(c.read(0, 512)).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_CONNECTION_LOST' });
  });

  it('falls back to oldstyle, plain newstyle and simple replies with older servers', async () => {
    const old = await serve(['-o', 'memory', '1M'], { tcp: true });
    const c1 = await connect({ host: '127.0.0.1', port: old.port! });
    expect(c1.handshake).toBe('oldstyle');
    expect(c1.structuredReplies).toBe(false);
    await c1.write(4096, pattern(8192, 3));
    expect(Buffer.from(await c1.read(4096, 8192)).equals(pattern(8192, 3))).toBe(true);
    await c1.close();

    const plain = await serve(['--mask-handshake=0', 'memory', '1M']);
    const c2 = await connect({ path: plain.socket! });
    expect(c2.handshake).toBe('newstyle');
    expect(c2.structuredReplies).toBe(false);
    expect(c2.metaContexts).toEqual([]);
    await c2.write(0, pattern(4096, 4));
    expect(Buffer.from(await c2.read(0, 4096)).equals(pattern(4096, 4))).toBe(true);
    await expect(c2.blockStatus(0, 4096)).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_UNSUPPORTED',
    });
    await c2.close();
  });

  it('reads through simple replies when the server has no structured replies', async () => {
    const p = await serve(['--no-sr', 'memory', '1M']);
    const c = await connect({ path: p.socket! });
    expect(c.handshake).toBe('fixed-newstyle');
    expect(c.structuredReplies).toBe(false);
    const data = pattern(96 * 1024, 5);
    await c.write(0, data);
    const parts = await Promise.all([c.read(0, 32 * 1024), c.read(32 * 1024, 64 * 1024)]);
    expect(Buffer.concat(parts.map((b) => Buffer.from(b))).equals(data)).toBe(true);
    await c.close();
  });

  it('chooses a named export, shows its description and reports an unknown one', async () => {
    const args = [
      '--filter=exportname',
      'memory',
      '1M',
      'exportname=disk1',
      'exportname-strict=true',
      'exportdesc=fixed:the first disk',
    ];
    const p = await serve(args);
    const c = await connect(`nbd+unix:///disk1?socket=${p.socket!}`);
    expect(c.exportName).toBe('disk1');
    expect(c.description).toBe('the first disk');
    await c.close();
    const err = await NbdClient.connect({ path: p.socket! }, { exportName: 'nope' }).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbdOptionError);
    expect(err).toMatchObject({
      code: 'ERR_VMDISK_NBD_OPTION_REFUSED',
      option: 'GO',
      reply: 'ERR_UNKNOWN',
    });
  });

  it('lists the exports with their descriptions', async () => {
    const p = await serve([
      '--filter=exportname',
      'memory',
      '1M',
      'exportname=disk1',
      'exportname=disk2',
      'exportname-list=explicit',
      'exportdesc=fixed:a memory disk',
    ]);
    const list = await NbdClient.listExports({ path: p.socket! });
    expect(list).toEqual([
      { name: 'disk1', description: 'a memory disk' },
      { name: 'disk2', description: 'a memory disk' },
    ]);
  });

  it('obeys block size constraints and splits requests over the maximum', async () => {
    const p = await serve([
      '--filter=blocksize-policy',
      'memory',
      '8M',
      'blocksize-minimum=4096',
      'blocksize-preferred=65536',
      'blocksize-maximum=1M',
      'blocksize-error-policy=error',
    ]);
    const c = await connect({ path: p.socket! });
    expect(c.blockSize).toEqual({ minimum: 4096, preferred: 65536, maximum: 1 * MiB });
    const data = pattern(3 * MiB, 9);
    await c.write(4096, data); // four requests of at most 1 MiB
    expect(Buffer.from(await c.read(4096, 3 * MiB)).equals(data)).toBe(true);
    await expect(c.write(100, Buffer.alloc(4096))).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_INVALID_REQUEST',
    });
    await expect(c.read(8 * MiB - 4096, 8192)).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_INVALID_REQUEST',
    });
    expect(c.inFlight).toBe(0);
    await c.close();
  });

  it('refuses writes on a read-only export before sending them', async () => {
    const p = await serve(['-r', 'memory', '1M']);
    const c = await connect({ path: p.socket! });
    expect(c.readOnly).toBe(true);
    await expect(c.write(0, Buffer.alloc(512))).rejects.toBeInstanceOf(NbdError);
    await expect(c.write(0, Buffer.alloc(512))).rejects.toMatchObject({
      code: 'ERR_VMDISK_NBD_READ_ONLY',
    });
    await expect(c.trim(0, 512)).rejects.toMatchObject({ code: 'ERR_VMDISK_NBD_UNSUPPORTED' });
    expect((await c.read(0, 512)).every((b) => b === 0)).toBe(true);
    await c.close();
  });

  it('reads a file through the file plugin', async () => {
    const file = join(t.dir, 'disk.img');
    const content = pattern(2 * MiB, 11);
    await writeFile(file, content);
    const p = await serve(['file', file]);
    const c = await connect({ path: p.socket! });
    expect(c.size).toBe(2 * MiB);
    expect(Buffer.from(await c.read(0, 2 * MiB)).equals(content)).toBe(true);
    const patch = pattern(64 * 1024, 12);
    await c.write(512 * 1024, patch, { fua: c.canFua });
    await c.close();
    const onDisk = await readFile(file);
    expect(onDisk.subarray(512 * 1024, 576 * 1024).equals(patch)).toBe(true);
    expect(onDisk.subarray(0, 512 * 1024).equals(content.subarray(0, 512 * 1024))).toBe(true);
  });
});
