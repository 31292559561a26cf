// The server's counters for metrics: connections accepted, negotiations that failed and
// TLS handshakes (server-wide), and per export the connections that reached it and its
// requests by command type, as real clients (qemu-io over TLS, a raw client) make them.

import { mkdirSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryTarget } from '../src/index.ts';
import { Command } from '../src/protocol.ts';
import { run, startServer, tempDir, until } from './server-helpers.ts';

const PSK_HEX = '3f1a9c0d4e5b6a7f8091a2b3c4d5e6f70123456789abcdef0fedcba987654321';

describe('NbdServer counters', () => {
  const tmp = tempDir();
  afterAll(() => tmp.cleanup());

  it('counts connections, failed negotiations, TLS handshakes and requests by type', async () => {
    const pskDir = join(tmp.dir, 'psk');
    mkdirSync(pskDir);
    const pskFile = join(pskDir, 'keys.psk');
    writeFileSync(pskFile, `alice:${PSK_HEX}\n`);
    const { server, port } = await startServer(
      [{ name: 'disk', target: new MemoryTarget(8 << 20), writable: true }],
      { tls: { pskFile, mode: 'require' } },
    );
    try {
      const io = await run('qemu-io', [
        '--object',
        `tls-creds-psk,id=tls0,endpoint=client,dir=${pskDir},username=alice`,
        '--image-opts',
        `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`,
        '-c',
        'write -P 0x21 1M 64k',
        '-c',
        'read 1M 4k',
        '-c',
        'read 0 4k',
        '-c',
        'write -z 2M 64k',
      ]);
      expect(io.code, io.stderr).toBe(0);
      // A client with the wrong key fails its TLS handshake; garbage fails negotiation.
      const wrongDir = join(tmp.dir, 'wrong');
      mkdirSync(wrongDir);
      writeFileSync(join(wrongDir, 'keys.psk'), `alice:${'00'.repeat(32)}\n`);
      const wrong = await run('qemu-io', [
        '--object',
        `tls-creds-psk,id=tls0,endpoint=client,dir=${wrongDir},username=alice`,
        '--image-opts',
        `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`,
        '-c',
        'read 0 4k',
      ]);
      expect(wrong.code).not.toBe(0);
      const garbage = connect(port, '127.0.0.1');
      garbage.on('data', () => garbage.write(Buffer.alloc(64, 0xff)));
      garbage.on('error', () => {});
      await until('the garbage refused', () => server.counters.negotiationFailures === 2);
      await until('the connections closed', () => server.connectionCount === 0);
      expect(server.counters).toEqual({ connections: 3, negotiationFailures: 2, tlsHandshakes: 1 });
      const stats = server.exportStats('disk');
      expect(stats.connectionsTotal).toBe(1);
      expect(stats.connections).toBe(0);
      expect(stats.commands[Command.READ]).toBe(2);
      expect(stats.commands[Command.WRITE]).toBe(1);
      expect(stats.commands[Command.WRITE_ZEROES]).toBe(1);
    } finally {
      await server.close();
    }
  });
});
