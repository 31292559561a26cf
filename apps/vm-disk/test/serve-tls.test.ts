// `vm-disk serve` with TLS credentials objects, as qemu-storage-daemon takes them:
// tls-creds-psk (DIR/keys.psk) and tls-creds-x509 (DIR/ca-cert.pem, server-cert.pem,
// server-key.pem; verify-peer on by default), checked with nbdinfo and qemu-img.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeCertificates } from '@vmdisk/test-support';
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
    const { server, client } = await makeCertificates(scratch.dir, 'x509');
    const ca = join(server, 'ca-cert.pem');
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
