// The NBD server's side of TLS credentials objects (tls-creds-x509 / tls-creds-psk of the
// graph's object registry), read from a directory laid out as QEMU reads it: ca-cert.pem, server-cert.pem, server-key.pem for
// X.509 (verify-peer=on: clients must present a certificate the CA signed); keys.psk
// (psktool's `identity:hexkey` lines) for PSK.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { NbdTlsCreds } from '@vmdisk/block-graph';
import type { NbdServerTlsOptions } from '@vmdisk/nbd';
import { VmDiskError } from './errors.ts';

function readCred(dir: string, file: string, id: string): Buffer {
  try {
    return readFileSync(join(dir, file));
  } catch (e) {
    throw new VmDiskError(
      'ERR_VMDISK_APP_BAD_OPTION',
      `TLS credentials '${id}': cannot read ${join(dir, file)}: ${(e as Error).message}`,
      { cause: e },
    );
  }
}

/** The NBD server's TLS options for server-side credentials (TLS then required). */
export function serverTlsOptions(creds: NbdTlsCreds, id: string): NbdServerTlsOptions {
  if (creds.endpoint !== 'server') {
    throw new VmDiskError(
      'ERR_VMDISK_APP_BAD_OPTION',
      `TLS credentials '${id}' are not for a server (endpoint=server)`,
    );
  }
  if (creds.type === 'psk') {
    // Read it now, so that a missing file is an error at start, not at the first client.
    readCred(creds.dir, 'keys.psk', id);
    return { mode: 'require', pskFile: join(creds.dir, 'keys.psk') };
  }
  return {
    mode: 'require',
    key: readCred(creds.dir, 'server-key.pem', id),
    cert: readCred(creds.dir, 'server-cert.pem', id),
    ...(creds.verifyPeer && { ca: readCred(creds.dir, 'ca-cert.pem', id) }),
  };
}
