// NBD URIs (doc/uri.md of the NetworkBlockDevice/nbd project):
//   nbd://host[:port]/export            TCP, no TLS
//   nbds://host[:port]/export           TCP, TLS required
//   nbd+unix:///export?socket=PATH      unix socket, no TLS
//   nbds+unix:///export?socket=PATH     unix socket, TLS required
// The export name is the path without its leading '/', percent-decoded. Query parameters
// understood: socket, tls-type (x509 | psk), tls-hostname, tls-verify-peer (0 | 1), and
// the libnbd extensions tls-psk-file and tls-certificates; the userinfo is the TLS (PSK)
// user name. Unknown parameters are an error, except experimental ones prefixed `x-`.

import { NbdError } from './errors.ts';

export const NBD_DEFAULT_PORT = 10809;

export type NbdTransport = { host: string; port: number } | { path: string };

export interface NbdUriTls {
  /** Authentication wanted by the URI (tls-type). */
  type?: 'x509' | 'psk';
  /** Name to verify the server's certificate against (tls-hostname). */
  hostname?: string;
  /** tls-verify-peer: false turns off verification of the server's certificate. */
  verifyPeer?: boolean;
  /** A PSK file in the `identity:hexkey` format of psktool, qemu and nbdkit. */
  pskFile?: string;
  /** A directory with ca-cert.pem, client-cert.pem and client-key.pem. */
  certificatesDir?: string;
  /** The PSK identity (the URI's userinfo). */
  username?: string;
}

export interface NbdUri {
  transport: NbdTransport;
  exportName: string;
  /** nbds and nbds+unix: the connection must use TLS. */
  tls: boolean;
  tlsOptions: NbdUriTls;
}

const invalid = (uri: string, why: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_INVALID_URI', `invalid NBD URI '${uri}': ${why}`);

const decode = (uri: string, s: string): string => {
  try {
    return decodeURIComponent(s);
  } catch {
    throw invalid(uri, `bad percent-encoding in '${s}'`);
  }
};

/** Parses an NBD URI; throws NbdError ERR_VMDISK_NBD_INVALID_URI on anything malformed. */
export function parseNbdUri(uri: string): NbdUri {
  const m = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(uri);
  if (!m) throw invalid(uri, 'expected scheme://[authority]/[export][?query]');
  const scheme = m[1]!.toLowerCase();
  const authority = m[2]!;
  const path = m[3]!;
  const query = m[4] ?? '';
  let unix: boolean;
  let tls: boolean;
  switch (scheme) {
    case 'nbd':
      unix = false;
      tls = false;
      break;
    case 'nbds':
      unix = false;
      tls = true;
      break;
    case 'nbd+unix':
      unix = true;
      tls = false;
      break;
    case 'nbds+unix':
      unix = true;
      tls = true;
      break;
    default:
      throw invalid(uri, `unknown scheme '${scheme}' (nbd, nbds, nbd+unix or nbds+unix)`);
  }

  // Authority: [userinfo@]host[:port], IPv6 literals in brackets (RFC 2732).
  let username: string | undefined;
  let hostPort = authority;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    username = decode(uri, authority.slice(0, at));
    hostPort = authority.slice(at + 1);
  }
  let host = '';
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw invalid(uri, 'unterminated IPv6 literal');
    host = hostPort.slice(1, close);
    const rest = hostPort.slice(close + 1);
    if (rest !== '') {
      if (!rest.startsWith(':')) throw invalid(uri, `unexpected '${rest}' after the IPv6 literal`);
      portText = rest.slice(1);
    }
  } else {
    const colon = hostPort.indexOf(':');
    if (colon >= 0) {
      host = hostPort.slice(0, colon);
      portText = hostPort.slice(colon + 1);
    } else {
      host = hostPort;
    }
    host = decode(uri, host);
  }
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== '') {
    if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) > 65535 || Number(portText) === 0) {
      throw invalid(uri, `bad port '${portText}'`);
    }
    port = Number(portText);
  }

  if (path !== '' && !path.startsWith('/')) throw invalid(uri, 'the path must start with /');
  const exportName = decode(uri, path.slice(1));
  if (exportName.includes('\0')) throw invalid(uri, 'the export name contains NUL');

  const tlsOptions: NbdUriTls = {};
  if (username !== undefined) tlsOptions.username = username;
  let socket: string | undefined;
  if (query !== '') {
    for (const part of query.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = decode(uri, eq >= 0 ? part.slice(0, eq) : part);
      const value = decode(uri, eq >= 0 ? part.slice(eq + 1) : '');
      switch (key) {
        case 'socket':
          socket = value;
          break;
        case 'tls-type':
          if (value === 'x509' || value === 'psk') tlsOptions.type = value;
          else throw invalid(uri, `tls-type '${value}' is not supported (x509 or psk)`);
          break;
        case 'tls-hostname':
          tlsOptions.hostname = value;
          break;
        case 'tls-verify-peer':
          if (value !== '0' && value !== '1') throw invalid(uri, 'tls-verify-peer must be 0 or 1');
          tlsOptions.verifyPeer = value === '1';
          break;
        case 'tls-psk-file':
          tlsOptions.pskFile = value;
          break;
        case 'tls-certificates':
          tlsOptions.certificatesDir = value;
          break;
        default:
          if (!key.startsWith('x-')) throw invalid(uri, `unknown query parameter '${key}'`);
      }
    }
  }

  let transport: NbdTransport;
  if (unix) {
    if (host !== '' || (portText !== undefined && portText !== '')) {
      throw invalid(uri, 'a unix-socket URI takes no host or port');
    }
    if (socket === undefined || socket === '') {
      throw invalid(uri, `${scheme} needs the query parameter socket=PATH`);
    }
    transport = { path: socket };
  } else {
    if (socket !== undefined) throw invalid(uri, `socket= is only for nbd+unix and nbds+unix`);
    if (host === '') throw invalid(uri, 'a TCP URI needs a host');
    transport = { host, port };
  }
  return { transport, exportName, tls, tlsOptions };
}
