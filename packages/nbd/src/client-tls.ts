// TLS for the NBD client: the credentials (X.509 or PSK) turned into Node's tls options,
// and the in-session upgrade after NBD_OPT_STARTTLS.

import { readFile } from 'node:fs/promises';
import { isIP, type Socket } from 'node:net';
import { join } from 'node:path';
import type * as Tls from 'node:tls';
import { NbdConnectionError, NbdError } from './errors.ts';

/** node:tls, loaded at first use: a client without TLS does not pay its memory. */
const tls = (): typeof Tls => process.getBuiltinModule('node:tls');

export interface NbdClientTlsOptions {
  /**
   * 'require' (the default): the connection fails unless TLS is negotiated.
   * 'prefer': use TLS if the server agrees, otherwise go on in plain text.
   */
  mode?: 'require' | 'prefer';
  /** A pre-shared key: the identity and the key (bytes, or hex as in a PSK file). */
  psk?: { identity: string; key: Uint8Array | string };
  /** A PSK file in the format of psktool, qemu and nbdkit: lines of `identity:hexkey`. */
  pskFile?: string;
  /** The identity to pick from pskFile (default: its first entry). */
  username?: string;
  /** PEM of the CA that signed the server's certificate (default: the system's CAs). */
  ca?: string | Uint8Array;
  /** PEM of the client's certificate and key, for servers that verify clients. */
  cert?: string | Uint8Array;
  key?: string | Uint8Array;
  /**
   * A directory as qemu and libnbd use it: ca-cert.pem, and client-cert.pem plus
   * client-key.pem when present. Explicit ca/cert/key take precedence.
   */
  certificatesDir?: string;
  /** The name the server's certificate must carry (default: the host connected to). */
  hostname?: string;
  /** false: accept any server certificate (default true). */
  verifyPeer?: boolean;
}

const tlsFailed = (message: string, cause?: unknown): NbdConnectionError =>
  new NbdConnectionError('ERR_VMDISK_NBD_TLS_FAILED', message, cause);

/** Parses a PSK file (`identity:hexkey` per line) and picks `identity` or the first. */
export function parsePskFile(
  text: string,
  identity: string | undefined,
  where: string,
): { identity: string; key: Buffer } {
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.indexOf(':');
    if (colon <= 0) throw tlsFailed(`${where}: a line is not 'identity:hexkey'`);
    const id = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (identity !== undefined && id !== identity) continue;
    if (hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw tlsFailed(`${where}: the key of '${id}' is not hexadecimal`);
    }
    return { identity: id, key: Buffer.from(hex, 'hex') };
  }
  throw tlsFailed(
    identity === undefined ? `${where}: no key in the file` : `${where}: no key for '${identity}'`,
  );
}

const keyBytes = (key: Uint8Array | string): Buffer => {
  if (typeof key !== 'string') return Buffer.from(key);
  if (key.length === 0 || key.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(key)) {
    throw tlsFailed('the PSK key string must be hexadecimal');
  }
  return Buffer.from(key, 'hex');
};

async function readOptional(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw tlsFailed(`cannot read ${path}`, err);
  }
}

/**
 * Builds the tls.connect options for the credentials (reads the files it names).
 * `host` is what the connection was made to, for the certificate check.
 */
export async function buildTlsConnectOptions(
  opts: NbdClientTlsOptions,
  host: string | undefined,
): Promise<Tls.ConnectionOptions> {
  let psk: { identity: string; key: Buffer } | undefined;
  if (opts.psk) psk = { identity: opts.psk.identity, key: keyBytes(opts.psk.key) };
  else if (opts.pskFile !== undefined) {
    let text: string;
    try {
      text = await readFile(opts.pskFile, 'utf8');
    } catch (err) {
      throw tlsFailed(`cannot read the PSK file ${opts.pskFile}`, err);
    }
    psk = parsePskFile(text, opts.username, opts.pskFile);
  }
  if (psk) {
    const chosen = psk;
    return {
      // PSK cipher suites are off by default; TLS 1.3 suites all work with a PSK.
      ciphers: 'PSK:ECDHE-PSK:DHE-PSK',
      minVersion: 'TLSv1.2',
      pskCallback: () => ({ identity: chosen.identity, psk: chosen.key }),
      // No certificate with PSK: the default identity check would fail.
      checkServerIdentity: () => undefined,
    };
  }

  let { ca, cert, key } = opts;
  if (opts.certificatesDir !== undefined) {
    const dir = opts.certificatesDir;
    ca ??= await readOptional(join(dir, 'ca-cert.pem'));
    if (cert === undefined && key === undefined) {
      cert = await readOptional(join(dir, 'client-cert.pem'));
      key = await readOptional(join(dir, 'client-key.pem'));
    }
  }
  if ((cert === undefined) !== (key === undefined)) {
    throw tlsFailed('a client certificate needs its key (and the other way round)');
  }
  const name = opts.hostname ?? (host === undefined || host === '' ? 'localhost' : host);
  const out: Tls.ConnectionOptions = {
    minVersion: 'TLSv1.2',
    rejectUnauthorized: opts.verifyPeer !== false,
    host: name,
  };
  if (isIP(name) === 0) out.servername = name;
  if (ca !== undefined) out.ca = typeof ca === 'string' ? ca : Buffer.from(ca);
  if (cert !== undefined) out.cert = typeof cert === 'string' ? cert : Buffer.from(cert);
  if (key !== undefined) out.key = typeof key === 'string' ? key : Buffer.from(key);
  return out;
}

/** Runs the TLS handshake on `socket` (after the server's ACK to STARTTLS). */
export function upgradeToTls(
  socket: Socket,
  options: Tls.ConnectionOptions,
): Promise<Tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    let secure: Tls.TLSSocket;
    try {
      secure = tls().connect({ ...options, socket });
    } catch (err) {
      reject(err instanceof NbdError ? err : tlsFailed('cannot start TLS', err));
      return;
    }
    const onError = (err: Error) => {
      cleanup();
      secure.destroy();
      reject(tlsFailed(`the TLS handshake failed: ${err.message}`, err));
    };
    const onClose = () => {
      cleanup();
      reject(tlsFailed('the server closed the connection during the TLS handshake'));
    };
    const onSecure = () => {
      cleanup();
      resolve(secure);
    };
    const cleanup = () => {
      secure.off('error', onError);
      secure.off('close', onClose);
      secure.off('secureConnect', onSecure);
    };
    secure.on('error', onError);
    secure.on('close', onClose);
    secure.on('secureConnect', onSecure);
  });
}
