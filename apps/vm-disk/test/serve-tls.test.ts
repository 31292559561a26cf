// `vm-disk serve` with TLS credentials objects, as qemu-storage-daemon takes them:
// tls-creds-psk (DIR/keys.psk) and tls-creds-x509 (DIR/ca-cert.pem, server-cert.pem,
// server-key.pem; verify-peer on by default), checked with nbdinfo and qemu-img.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type RunningProcess, run, startServe, useScratch } from './harness/daemon.ts';

const scratch = useScratch('vmdisk-tls-');

let server: RunningProcess | undefined;
afterEach(async () => {
  await server?.stop('SIGKILL');
});

async function serveWith(object: string): Promise<{ sock: string }> {
  const image = scratch.path('disk.raw');
  writeFileSync(image, Buffer.alloc(1 << 20, 0x3c));
  const sock = scratch.path('nbd.sock');
  server = await startServe([
    '--object',
    object,
    '--blockdev',
    `driver=file,node-name=f0,filename=${image}`,
    '--blockdev',
    'driver=raw,node-name=d0,file=f0',
    '--nbd-server',
    `addr.type=unix,addr.path=${sock},tls-creds=t0`,
    '--export',
    'type=nbd,id=e0,node-name=d0,name=disk',
  ]);
  return { sock };
}

async function openssl(args: string[]): Promise<void> {
  await run('openssl', args);
}

describe('vm-disk serve with TLS', () => {
  it('PSK: a client with the key reads; one without TLS or with a wrong key is refused', async () => {
    const creds = scratch.path('psk');
    mkdirSync(creds);
    writeFileSync(join(creds, 'keys.psk'), 'alice:0123456789abcdef0123456789abcdef\n');
    const { sock } = await serveWith(`tls-creds-psk,id=t0,dir=${creds},endpoint=server`);
    const uri = (file: string) => `nbds+unix://alice@/disk?socket=${sock}&tls-psk-file=${file}`;
    const info = JSON.parse(await run('nbdinfo', ['--json', uri(join(creds, 'keys.psk'))]));
    expect(info.exports[0]['export-size']).toBe(1 << 20);
    await expect(run('nbdinfo', [`nbd+unix:///disk?socket=${sock}`])).rejects.toThrow();
    const wrong = scratch.path('wrong.psk');
    writeFileSync(wrong, 'alice:ffffffffffffffffffffffffffffffff\n');
    await expect(run('nbdinfo', [uri(wrong)])).rejects.toThrow();
    // qemu-io through qemu's own TLS client.
    await run('qemu-io', [
      '--object',
      `tls-creds-psk,id=c0,endpoint=client,dir=${creds},username=alice`,
      '--image-opts',
      `driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=c0`,
      '-r',
      '-c',
      'read -P 0x3c 0 1M',
    ]);
  });

  it('X.509 with verify-peer: a client with a certificate from the CA reads; one without is refused', async () => {
    const server = scratch.path('server');
    const client = scratch.path('client');
    mkdirSync(server);
    mkdirSync(client);
    const ca = join(server, 'ca-cert.pem');
    const caKey = scratch.path('ca-key.pem');
    await openssl([
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '2',
      '-subj',
      '/CN=vm-disk test CA',
      '-keyout',
      caKey,
      '-out',
      ca,
    ]);
    for (const [who, folder] of [
      ['server', server],
      ['client', client],
    ] as const) {
      const key = join(folder, `${who}-key.pem`);
      const csr = scratch.path(`${who}.csr`);
      const ext = scratch.path(`${who}.ext`);
      writeFileSync(
        ext,
        who === 'server'
          ? 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'
          : 'extendedKeyUsage=clientAuth\n',
      );
      await openssl([
        'req',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-subj',
        `/CN=${who === 'server' ? 'localhost' : 'vm-disk client'}`,
        '-keyout',
        key,
        '-out',
        csr,
      ]);
      await openssl([
        'x509',
        '-req',
        '-in',
        csr,
        '-CA',
        ca,
        '-CAkey',
        caKey,
        '-CAcreateserial',
        '-days',
        '2',
        '-extfile',
        ext,
        '-out',
        join(folder, `${who}-cert.pem`),
      ]);
    }
    writeFileSync(join(client, 'ca-cert.pem'), await run('cat', [ca]));
    const { sock } = await serveWith(`tls-creds-x509,id=t0,dir=${server},endpoint=server`);
    const info = JSON.parse(
      await run('nbdinfo', [
        '--json',
        `nbds+unix:///disk?socket=${sock}&tls-certificates=${client}&tls-verify-peer=false`,
      ]),
    );
    expect(info.exports[0]['export-size']).toBe(1 << 20);
    const noCert = scratch.path('nocert');
    mkdirSync(noCert);
    writeFileSync(join(noCert, 'ca-cert.pem'), await run('cat', [ca]));
    await expect(
      run('nbdinfo', [
        `nbds+unix:///disk?socket=${sock}&tls-certificates=${noCert}&tls-verify-peer=false`,
      ]),
    ).rejects.toThrow();
  });

  it('refuses credentials it cannot read before anything starts', async () => {
    const missing = scratch.path('nothing-here');
    await expect(serveWith(`tls-creds-psk,id=t0,dir=${missing},endpoint=server`)).rejects.toThrow(
      /keys\.psk/,
    );
  });
});
