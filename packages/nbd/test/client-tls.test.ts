// Our client over TLS against nbdkit: PSK (a psktool-format key file) and X.509
// (certificates made with the openssl CLI, the server verifying the client too).

import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeCertificates } from '../../../tools/test-support/src/index.ts';
import { NbdClient, NbdConnectionError } from '../src/index.ts';
import { pattern, qemuNbd, run, usePeers } from './client-peers.ts';

const KEY = '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef';

describe('NbdClient over TLS against nbdkit and qemu-nbd', () => {
  const t = usePeers();
  const serve = t.nbdkit;

  it('uses a pre-shared key from a psk file (nbds+unix URI with tls-psk-file)', async () => {
    const psk = join(t.dir, 'keys.psk');
    await writeFile(psk, `alice:${KEY}\n`);
    const p = await serve(['--tls=require', `--tls-psk=${psk}`, 'memory', '1M']);
    const uri = `nbds+unix://alice@/?socket=${encodeURIComponent(p.socket!)}&tls-psk-file=${encodeURIComponent(psk)}`;
    const c = await NbdClient.connect(uri);
    t.trackClient(c);
    expect(c.tls).toBe(true);
    expect(c.structuredReplies).toBe(true);
    const data = pattern(128 * 1024, 21);
    await c.write(4096, data);
    expect(Buffer.from(await c.read(4096, data.length)).equals(data)).toBe(true);
    const st = (await c.blockStatus(0, 1024 * 1024)).get('base:allocation')!;
    expect(st.length).toBeGreaterThan(0);
    await c.close();
    expect(await c.closed).toBeUndefined();
  });

  it('refuses plain text against a TLS-only server, and a wrong key', async () => {
    const psk = join(t.dir, 'keys.psk');
    await writeFile(psk, `alice:${KEY}\n`);
    const p = await serve(['--tls=require', `--tls-psk=${psk}`, 'memory', '1M']);
    const plain = await NbdClient.connect({ path: p.socket! }).catch((e: unknown) => e);
    expect(plain).toBeInstanceOf(NbdConnectionError);
    expect(plain).toMatchObject({ code: 'ERR_VMDISK_NBD_TLS_REQUIRED' });

    const wrong = await NbdClient.connect(
      { path: p.socket! },
      { tls: { psk: { identity: 'alice', key: KEY.replace(/^01/, 'ff') } } },
    ).catch((e: unknown) => e);
    expect(wrong).toMatchObject({ code: 'ERR_VMDISK_NBD_TLS_FAILED' });

    const right = await NbdClient.connect(
      { path: p.socket! },
      { tls: { psk: { identity: 'alice', key: KEY } } },
    );
    t.trackClient(right);
    expect(right.tls).toBe(true);
    await right.close();
  });

  it('goes on in plain text only when TLS is merely preferred', async () => {
    const p = await serve(['memory', '1M']);
    const creds = { psk: { identity: 'alice', key: KEY } };
    const refused = await NbdClient.connect({ path: p.socket! }, { tls: creds }).catch(
      (e: unknown) => e,
    );
    expect(refused).toBeInstanceOf(NbdConnectionError);
    expect(refused).toMatchObject({ code: 'ERR_VMDISK_NBD_TLS_FAILED' });
    expect((refused as Error).message).toMatch(/refused STARTTLS/);
    const c = await NbdClient.connect({ path: p.socket! }, { tls: { ...creds, mode: 'prefer' } });
    t.trackClient(c);
    expect(c.tls).toBe(false);
    await c.write(0, pattern(4096, 24));
    expect(Buffer.from(await c.read(0, 4096)).equals(pattern(4096, 24))).toBe(true);
    await c.close();
  });

  it('uses X.509 certificates, the server verifying the client', async () => {
    const certs = await makeCertificates(t.dir, 'good');
    const p = await serve(
      ['--tls=require', `--tls-certificates=${certs.server}`, '--tls-verify-peer', 'memory', '2M'],
      { tcp: true },
    );
    const uri = `nbds://127.0.0.1:${p.port!}/?tls-certificates=${encodeURIComponent(certs.client)}`;
    const c = await NbdClient.connect(uri);
    t.trackClient(c);
    expect(c.tls).toBe(true);
    expect(c.size).toBe(2 * 1024 * 1024);
    const data = pattern(256 * 1024, 22);
    await Promise.all([c.write(0, data), c.write(1024 * 1024, data)]);
    const [a, b] = await Promise.all([c.read(0, data.length), c.read(1024 * 1024, data.length)]);
    expect(Buffer.from(a).equals(data) && Buffer.from(b).equals(data)).toBe(true);
    await c.close();

    // A client that trusts another CA must not accept this server.
    const other = await makeCertificates(t.dir, 'other');
    const bad = await NbdClient.connect(
      `nbds://127.0.0.1:${p.port!}/?tls-certificates=${encodeURIComponent(other.client)}`,
    ).catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(NbdConnectionError);
    expect(bad).toMatchObject({ code: 'ERR_VMDISK_NBD_TLS_FAILED' });
  });

  it('talks TLS to qemu-nbd too: X.509 and PSK credentials objects', async () => {
    const img = join(t.dir, 'disk.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', img, '2M']);
    const certs = await makeCertificates(t.dir, 'qemu');
    const x509 = await qemuNbd(
      t.dir,
      [
        '--object',
        `tls-creds-x509,id=tls0,endpoint=server,dir=${certs.server},verify-peer=on`,
        '--tls-creds',
        'tls0',
        '-f',
        'raw',
        img,
      ],
      { tcp: true },
    );
    t.track(x509);
    const c = await NbdClient.connect(`nbds://127.0.0.1:${x509.port!}/`, {
      tls: { certificatesDir: certs.client },
    });
    t.trackClient(c);
    expect(c.tls).toBe(true);
    const data = pattern(64 * 1024, 23);
    await c.write(0, data);
    expect(Buffer.from(await c.read(0, data.length)).equals(data)).toBe(true);
    const st = (await c.blockStatus(0, c.size)).get('base:allocation')!;
    expect(st[0]).toMatchObject({ hole: false });
    await c.close();
    await x509.stop();

    const pskDir = join(t.dir, 'psk');
    await run('mkdir', ['-p', pskDir]);
    await writeFile(join(pskDir, 'keys.psk'), `bob:${KEY}\n`);
    const psk = await qemuNbd(t.dir, [
      '--object',
      `tls-creds-psk,id=tls1,endpoint=server,dir=${pskDir}`,
      '--tls-creds',
      'tls1',
      '-f',
      'raw',
      img,
    ]);
    t.track(psk);
    const c2 = await NbdClient.connect(
      `nbds+unix://bob@/?socket=${encodeURIComponent(psk.socket!)}&tls-psk-file=${encodeURIComponent(join(pskDir, 'keys.psk'))}`,
    );
    t.trackClient(c2);
    expect(c2.tls).toBe(true);
    expect(Buffer.from(await c2.read(0, data.length)).equals(data)).toBe(true);
    await c2.close();
  });
});
