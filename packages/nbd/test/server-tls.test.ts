// STARTTLS on the server: PSK (a qemu/nbdkit key file) and X.509 (certificates made
// with the openssl CLI), checked with nbdinfo and qemu-img; TLS 'require' mode and the
// rule that plain-text state is forgotten, checked with a raw client.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCertificates } from '../../../tools/test-support/src/index.ts';
import { MemoryTarget, NbdServer, parsePskKeys } from '../src/index.ts';
import { Command, Option, OptionReply, TransmissionFlag } from '../src/protocol.ts';
import { RawNbd } from './raw-nbd.ts';
import { run, type Started, startServer, tempDir } from './server-helpers.ts';

const PSK_HEX = '3f1a9c0d4e5b6a7f8091a2b3c4d5e6f70123456789abcdef0fedcba987654321';

describe('NbdServer TLS', () => {
  const tmp = tempDir();
  let pki = { server: '', client: '' };
  const clientNoCert = join(tmp.dir, 'client-no-cert');
  const pskDir = join(tmp.dir, 'psk');
  const pskFile = join(pskDir, 'keys.psk');
  let psk: Started;
  let x509: Started;

  beforeAll(async () => {
    const { mkdirSync, copyFileSync, readFileSync } = await import('node:fs');
    mkdirSync(clientNoCert);
    mkdirSync(pskDir);
    pki = await makeCertificates(tmp.dir, 'pki');
    copyFileSync(join(pki.client, 'ca-cert.pem'), join(clientNoCert, 'ca-cert.pem'));
    writeFileSync(pskFile, `# comment\nalice:${PSK_HEX}\n`);
    const mem = new MemoryTarget(8 << 20);
    await mem.write(0, Buffer.alloc(65536, 0x6b), {});
    psk = await startServer([{ name: 'disk', target: mem, writable: true }], { tls: { pskFile } });
    x509 = await startServer([{ name: 'disk', target: mem, writable: true }], {
      tls: {
        mode: 'require',
        key: readFileSync(join(pki.server, 'server-key.pem')),
        cert: readFileSync(join(pki.server, 'server-cert.pem')),
        ca: readFileSync(join(pki.server, 'ca-cert.pem')),
      },
    });
  }, 60_000);
  afterAll(async () => {
    await psk?.server.close();
    await x509?.server.close();
    tmp.cleanup();
  });

  it('PSK: nbdinfo and qemu-io over TLS with the key file', async () => {
    const info = await run('nbdinfo', [
      `nbds://alice@127.0.0.1:${psk.port}/disk?tls-psk-file=${pskFile}`,
    ]);
    expect(info.stdout).toMatch(/with TLS/);
    expect(info.code).toBe(0);
    const io = await run('qemu-io', [
      '--object',
      `tls-creds-psk,id=tls0,endpoint=client,dir=${pskDir},username=alice`,
      '--image-opts',
      `driver=nbd,host=127.0.0.1,port=${psk.port},export=disk,tls-creds=tls0`,
      '-c',
      'read -P 0x6b 0 64k',
      '-c',
      'write -P 0x21 1M 64k',
      '-c',
      'read -P 0x21 1M 64k',
    ]);
    expect(io.stdout + io.stderr).not.toMatch(/fail|error/i);
    expect(io.code).toBe(0);
  });

  it('PSK: a wrong key or identity fails the handshake, and the server goes on', async () => {
    const badFile = join(tmp.dir, 'bad.psk');
    writeFileSync(badFile, `alice:${'00'.repeat(32)}\nmallory:${PSK_HEX}\n`);
    const wrongKey = await run('nbdinfo', [
      `nbds://alice@127.0.0.1:${psk.port}/disk?tls-psk-file=${badFile}`,
    ]);
    expect(wrongKey.code).not.toBe(0);
    const wrongUser = await run('nbdinfo', [
      `nbds://mallory@127.0.0.1:${psk.port}/disk?tls-psk-file=${badFile}`,
    ]);
    expect(wrongUser.code).not.toBe(0);
    const ok = await run('nbdinfo', [
      `nbds://alice@127.0.0.1:${psk.port}/disk?tls-psk-file=${pskFile}`,
    ]);
    expect(ok.code).toBe(0);
  });

  it('X.509: qemu-img and nbdinfo with a client certificate; without one the CA refuses', async () => {
    const img = await run('qemu-img', [
      'info',
      '--object',
      `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.client}`,
      '--image-opts',
      `driver=nbd,host=127.0.0.1,port=${x509.port},export=disk,tls-creds=tls0`,
    ]);
    expect(img.stderr).toBe('');
    expect(img.stdout).toMatch(/virtual size: 8 MiB/);
    const io = await run('qemu-io', [
      '--object',
      `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.client}`,
      '--image-opts',
      `driver=nbd,host=127.0.0.1,port=${x509.port},export=disk,tls-creds=tls0`,
      '-c',
      'read -P 0x6b 0 64k',
    ]);
    expect(io.stdout + io.stderr).not.toMatch(/fail|error/i);
    const info = await run('nbdinfo', [
      `nbds://127.0.0.1:${x509.port}/disk?tls-certificates=${pki.client}`,
    ]);
    expect(info.code).toBe(0);
    expect(info.stdout).toMatch(/with TLS/);
    const noCert = await run('nbdinfo', [
      `nbds://127.0.0.1:${x509.port}/disk?tls-certificates=${clientNoCert}`,
    ]);
    expect(noCert.code).not.toBe(0);
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${x509.port}/disk`]);
    expect(plain.code).not.toBe(0);
  });

  it('X.509 from a qemu-style certificates directory, without client verification', async () => {
    const serverDir = join(tmp.dir, 'server-dir');
    const { mkdirSync, copyFileSync } = await import('node:fs');
    mkdirSync(serverDir);
    for (const f of ['server-cert.pem', 'server-key.pem'])
      copyFileSync(join(pki.server, f), join(serverDir, f));
    const t = await startServer([{ name: 'd', target: new MemoryTarget(1 << 20) }], {
      tls: { certificatesDir: serverDir },
    });
    // No CA in the directory: any client that trusts the server is let in.
    const info = await run('nbdinfo', [
      `nbds://127.0.0.1:${t.port}/d?tls-certificates=${clientNoCert}`,
    ]);
    expect(info.stdout).toMatch(/with TLS/);
    expect(info.code).toBe(0);
    await t.server.close();
    expect(() => new NbdServer({ tls: { certificatesDir: join(tmp.dir, 'nowhere') } })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
    expect(() => new NbdServer({ tls: { key: 'not a key', cert: 'not a cert' } })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
  });

  it('require mode: only STARTTLS and ABORT before TLS; EXPORT_NAME disconnects', async () => {
    const nbd = await RawNbd.connect(psk.port);
    await nbd.handshake();
    for (const opt of [Option.LIST, Option.STRUCTURED_REPLY, Option.INFO, Option.GO, 99]) {
      const data = opt === Option.INFO || opt === Option.GO ? RawNbd.goData('disk') : undefined;
      expect(await nbd.simpleOption(opt, data)).toBe(OptionReply.ERR_TLS_REQD);
    }
    nbd.sendOption(Option.EXPORT_NAME, Buffer.from('disk'));
    expect(await nbd.closedWithin()).toBe(true);
    const plain = await RawNbd.connect(psk.port);
    await plain.handshake(0); // not fixed newstyle: cannot do TLS at all
    expect(await plain.closedWithin()).toBe(true);
  });

  it('drops a client that answers STARTTLS with garbage instead of a TLS handshake', async () => {
    const codes: string[] = [];
    psk.server.on('error', (e) => codes.push(e.error.code));
    const nbd = await RawNbd.connect(psk.port);
    await nbd.handshake();
    expect(await nbd.simpleOption(Option.STARTTLS)).toBe(OptionReply.ACK);
    nbd.write(Buffer.alloc(64, 0x47));
    expect(await nbd.closedWithin()).toBe(true);
    expect(codes).toContain('ERR_VMDISK_NBD_TLS_HANDSHAKE');
    const ok = await run('nbdinfo', [
      `nbds://alice@127.0.0.1:${psk.port}/disk?tls-psk-file=${pskFile}`,
    ]);
    expect(ok.code).toBe(0);
  });

  it("'on' mode: state negotiated in plain text is forgotten after STARTTLS", async () => {
    const server = new NbdServer({ tls: { mode: 'on', psk: { alice: PSK_HEX } } });
    server.addExport({ name: 'd', target: new MemoryTarget(65536) });
    const addr = (await server.listen({ port: 0 })) as { port: number };
    // Plain text is allowed in 'on' mode.
    const plain = await RawNbd.open(addr.port, 'd', { structured: true });
    expect(plain.flags & TransmissionFlag.SEND_DF).toBe(TransmissionFlag.SEND_DF);
    plain.nbd.destroy();
    const nbd = await RawNbd.connect(addr.port);
    await nbd.handshake();
    expect(await nbd.simpleOption(Option.STRUCTURED_REPLY)).toBe(OptionReply.ACK);
    expect(await nbd.simpleOption(Option.STARTTLS)).toBe(OptionReply.ACK);
    const secure = tls.connect({
      socket: nbd.socket,
      ciphers: 'PSK-AES128-GCM-SHA256',
      maxVersion: 'TLSv1.2',
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ identity: 'alice', psk: Buffer.from(PSK_HEX, 'hex') }),
    });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    const t = RawNbd.fromSocket(secure);
    expect(await t.simpleOption(Option.STARTTLS)).toBe(OptionReply.ERR_INVALID);
    const replies = await t.go('d');
    expect(replies[replies.length - 1]!.type).toBe(OptionReply.ACK);
    const info = replies.find((r) => r.type === OptionReply.INFO && r.data.readUInt16BE(0) === 0)!;
    // Structured replies were negotiated before TLS only: DF is not offered, replies are simple.
    expect(info.data.readUInt16BE(10) & TransmissionFlag.SEND_DF).toBe(0);
    t.request({ type: Command.READ, cookie: 3n, offset: 0n, length: 512 });
    expect(await t.simpleReply()).toEqual({ error: 0, cookie: 3n });
    await t.read(512);
    t.destroy();
    await server.close();
  });

  it('refuses bad TLS configurations and PSK files with stable codes', () => {
    expect(() => parsePskKeys('alice:xyz\n', 'f')).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_PSK_FILE' }),
    );
    expect(() => parsePskKeys('\n', 'f')).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_PSK_FILE' }),
    );
    expect(parsePskKeys('a:b:0011\n', 'f').get('a:b')).toEqual(Buffer.from([0, 0x11]));
    expect(() => new NbdServer({ tls: { pskFile: join(tmp.dir, 'missing') } })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_PSK_FILE' }),
    );
    expect(() => new NbdServer({ tls: { mode: 'require' } })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_NBD_INVALID_ARGUMENT' }),
    );
  });
});
