// TLS for the NBD server: X.509 (key, certificate, optional CA to verify clients) and PSK
// (the identity-to-key file of qemu and nbdkit, lines of `identity:hexkey`), applied to a
// connection in place after NBD_OPT_STARTTLS.

import { existsSync, readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import type * as Tls from 'node:tls';
import { NbdError } from './errors.ts';

export interface NbdServerTlsOptions {
  /**
   * 'off': STARTTLS is refused; 'on': clients may upgrade; 'require': nothing but STARTTLS
   * and ABORT before TLS (the default when TLS options are given).
   */
  mode?: 'off' | 'on' | 'require';
  /** X.509: the server's private key and certificate chain (PEM). */
  key?: string | Uint8Array;
  cert?: string | Uint8Array;
  /** X.509: a CA (PEM); clients must then present a certificate it signed. */
  ca?: string | Uint8Array;
  /**
   * X.509 from a directory as qemu's tls-creds-x509 (endpoint=server) reads it:
   * server-cert.pem, server-key.pem, and ca-cert.pem when present. Explicit key, cert
   * and ca take precedence.
   */
  certificatesDir?: string;
  /** X.509: require a client certificate signed by the CA (default: when a CA is given). */
  verifyPeer?: boolean;
  /** PSK: a file of `identity:hexkey` lines (psktool's format, as qemu and nbdkit read). */
  pskFile?: string;
  /** PSK: the keys directly, identity to key (bytes or hex). */
  psk?: Record<string, Uint8Array | string>;
}

/** The server's TLS configuration, resolved once. */
export interface ServerTls {
  readonly mode: 'off' | 'on' | 'require';
  readonly context?: Tls.SecureContext;
  readonly psk?: ReadonlyMap<string, Buffer>;
  readonly verifyClients: boolean;
}

/** node:tls, loaded at first use: a server without TLS does not pay its memory (issue 18). */
const tls = (): typeof Tls => process.getBuiltinModule('node:tls');

const invalid = (message: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', message);

const HEX_KEY = /^(?:[0-9a-fA-F]{2})+$/;

/** Parses a PSK file: `identity:hexkey` per line; blank lines and `#` comments skipped. */
export function parsePskKeys(text: string, where: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.lastIndexOf(':');
    const identity = colon > 0 ? line.slice(0, colon) : '';
    const hex = line.slice(colon + 1);
    if (identity === '' || !HEX_KEY.test(hex)) {
      throw new NbdError(
        'ERR_VMDISK_NBD_PSK_FILE',
        `${where}:${i + 1}: expected identity:hexkey (an even number of hex digits)`,
      );
    }
    keys.set(identity, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new NbdError('ERR_VMDISK_NBD_PSK_FILE', `${where}: no keys`);
  return keys;
}

// PSK suites of TLS 1.2 that GnuTLS (qemu, libnbd, nbdkit) offers with +ECDHE-PSK:+DHE-PSK:+PSK.
const PSK_CIPHERS = [
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

export function resolveServerTls(options: NbdServerTlsOptions | undefined): ServerTls {
  if (options === undefined) return { mode: 'off', verifyClients: false };
  let psk: Map<string, Buffer> | undefined;
  if (options.pskFile !== undefined) {
    let text: string;
    try {
      text = readFileSync(options.pskFile, 'utf8');
    } catch (cause) {
      throw new NbdError('ERR_VMDISK_NBD_PSK_FILE', `cannot read ${options.pskFile}`, { cause });
    }
    psk = parsePskKeys(text, options.pskFile);
  }
  if (options.psk !== undefined) {
    psk ??= new Map();
    for (const [identity, key] of Object.entries(options.psk)) {
      if (typeof key === 'string' && !HEX_KEY.test(key)) {
        throw invalid(`tls.psk: the key of ${identity} is not hex`);
      }
      psk.set(identity, typeof key === 'string' ? Buffer.from(key, 'hex') : Buffer.from(key));
    }
  }
  let { key, cert, ca } = options;
  if (options.certificatesDir !== undefined) {
    const dir = options.certificatesDir;
    const read = (file: string): Buffer => {
      try {
        return readFileSync(join(dir, file));
      } catch (cause) {
        throw new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', `cannot read ${join(dir, file)}`, {
          cause,
        });
      }
    };
    key ??= read('server-key.pem');
    cert ??= read('server-cert.pem');
    if (ca === undefined && existsSync(join(dir, 'ca-cert.pem'))) ca = read('ca-cert.pem');
  }
  const x509 = key !== undefined || cert !== undefined;
  if (x509 && (key === undefined || cert === undefined)) {
    throw invalid('tls: X.509 needs both key and cert');
  }
  const verifyClients = options.verifyPeer ?? ca !== undefined;
  if (verifyClients && ca === undefined) throw invalid('tls: verifyPeer needs a CA');
  const mode = options.mode ?? 'require';
  if (mode !== 'off' && !x509 && psk === undefined) {
    throw invalid(`tls mode '${mode}' needs X.509 (key, cert) or PSK keys`);
  }
  if (mode === 'off') return { mode, verifyClients: false };
  let context: Tls.SecureContext;
  try {
    context = tls().createSecureContext({
      ...(x509 ? { key: toPem(key), cert: toPem(cert) } : {}),
      ...(ca !== undefined ? { ca: toPem(ca) } : {}),
      // With PSK only, TLS 1.2 PSK suites; with a certificate too, the defaults as well.
      ...(psk !== undefined
        ? x509
          ? { ciphers: `${tls().DEFAULT_CIPHERS}:${PSK_CIPHERS}` }
          : { ciphers: PSK_CIPHERS, maxVersion: 'TLSv1.2' as const }
        : {}),
    });
  } catch (cause) {
    throw new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', `tls: ${String(cause)}`, { cause });
  }
  return {
    mode,
    context,
    ...(psk !== undefined ? { psk } : {}),
    verifyClients,
  };
}

const toPem = (v: string | Uint8Array | undefined): string | Buffer =>
  typeof v === 'string' ? v : Buffer.from(v ?? []);

/**
 * Starts TLS (server side) on a socket whose NBD_OPT_STARTTLS was acknowledged. Resolves
 * with the TLS socket once the handshake is done; rejects if it fails.
 */
export function startServerTls(raw: Socket, config: ServerTls): Promise<Tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const psk = config.psk;
    const secure = new (tls().TLSSocket)(raw, {
      isServer: true,
      ...(config.context !== undefined ? { secureContext: config.context } : {}),
      requestCert: config.verifyClients,
      rejectUnauthorized: config.verifyClients,
      ...(psk !== undefined
        ? { pskCallback: (_socket: Tls.TLSSocket, identity: string) => psk.get(identity) ?? null }
        : {}),
    });
    const fail = (err: Error): void => {
      secure.destroy();
      reject(
        new NbdError('ERR_VMDISK_NBD_TLS_HANDSHAKE', `TLS handshake failed: ${err.message}`, {
          cause: err,
        }),
      );
    };
    secure.once('error', fail);
    const closed = (): void => fail(new Error('the connection closed during the TLS handshake'));
    raw.once('close', closed);
    secure.once('secure', () => {
      secure.removeListener('error', fail);
      raw.removeListener('close', closed);
      resolve(secure);
    });
  });
}
