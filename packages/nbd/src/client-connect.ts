// Opening a client connection: the target resolved (an NBD URI, a TCP address or a unix
// socket, with TLS options merged), the socket connected, and the handshake run
// (client-negotiation.ts) within the connect timeout and the caller's abort signal.

import * as net from 'node:net';
import { type Negotiated, negotiate } from './client-negotiation.ts';
import type { NbdClientTlsOptions } from './client-tls.ts';
import { NbdConnectionError, NbdError } from './errors.ts';
import { META_CONTEXT_ALLOCATION_DEPTH, META_CONTEXT_BASE_ALLOCATION } from './protocol.ts';
import { ReadRouter } from './read-router.ts';
import { type NbdTransport, parseNbdUri } from './uri.ts';

const invalidRequest = (message: string): NbdError =>
  new NbdError('ERR_VMDISK_NBD_INVALID_REQUEST', message);

/** Where to connect: an NBD URI, a TCP address (port 10809 by default) or a unix socket. */
export type NbdConnectTarget = string | URL | { host: string; port?: number } | { path: string };

export interface NbdClientOptions {
  /** The export to use (default: the URI's, else "" — the server's default export). */
  exportName?: string;
  /** TLS credentials; merged over those an nbds:// URI names. */
  tls?: NbdClientTlsOptions;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Negotiate extended headers when the server offers them (default true). */
  extendedHeaders?: boolean;
  /** Select base:allocation for blockStatus (default true). */
  baseAllocation?: boolean;
  /** Also select qemu:allocation-depth (default false). */
  allocationDepth?: boolean;
  /** Further meta contexts to select (e.g. 'qemu:dirty-bitmap:NAME'). */
  metaContexts?: string[];
  /**
   * Requests on the wire at once (default: no limit); more wait in order in the client.
   * Split requests count piece by piece.
   */
  maxInFlight?: number;
  /** Milliseconds for the TCP connect plus the whole handshake (default 30 000; 0: none). */
  connectTimeout?: number;
  /**
   * Called with the connected socket before the handshake (socket options Node's net
   * module has no call for, e.g. a unix socket's send buffer). If it throws, the connect
   * fails with ERR_VMDISK_NBD_CONFIGURE_SOCKET.
   */
  configureSocket?: (socket: net.Socket) => void;
  signal?: AbortSignal;
}

function resolveTarget(
  target: NbdConnectTarget,
  options: NbdClientOptions,
): { transport: NbdTransport; exportName: string; tls: NbdClientTlsOptions | undefined } {
  if (typeof target === 'string' || target instanceof URL) {
    const uri = parseNbdUri(String(target));
    let tls: NbdClientTlsOptions | undefined;
    if (uri.tls || options.tls) {
      tls = { ...uri.tlsOptions, ...options.tls };
      if (uri.tls) tls.mode = 'require';
      if (uri.tlsOptions.type === 'psk' && !tls.psk && tls.pskFile === undefined) {
        throw new NbdError(
          'ERR_VMDISK_NBD_INVALID_URI',
          'tls-type=psk needs tls-psk-file or a key',
        );
      }
    }
    return { transport: uri.transport, exportName: options.exportName ?? uri.exportName, tls };
  }
  if ('path' in target) {
    if (typeof target.path !== 'string' || target.path === '') {
      throw invalidRequest('a unix socket target needs a path');
    }
    return {
      transport: { path: target.path },
      exportName: options.exportName ?? '',
      tls: options.tls,
    };
  }
  const port = target.port ?? 10809;
  if (!Number.isInteger(port) || port <= 0 || port > 65535) {
    throw invalidRequest(`bad port ${port}`);
  }
  return {
    transport: { host: target.host, port },
    exportName: options.exportName ?? '',
    tls: options.tls,
  };
}

function connectSocket(
  transport: NbdTransport,
  signal: AbortSignal,
  router: ReadRouter | undefined,
): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const onread = router ? { onread: router.onread } : {};
    const socket =
      'path' in transport
        ? net.connect({ path: transport.path, ...onread })
        : net.connect({ host: transport.host, port: transport.port, ...onread });
    const where = 'path' in transport ? transport.path : `${transport.host}:${transport.port}`;
    const onError = (err: Error) => {
      cleanup();
      socket.destroy();
      reject(
        new NbdConnectionError(
          'ERR_VMDISK_NBD_CONNECT_FAILED',
          `cannot connect to the NBD server at ${where}: ${err.message}`,
          err,
        ),
      );
    };
    const onConnect = () => {
      cleanup();
      resolve(socket);
    };
    const onAbort = () => {
      cleanup();
      socket.destroy();
      reject(signal.reason);
    };
    const cleanup = () => {
      socket.off('error', onError);
      socket.off('connect', onConnect);
      signal.removeEventListener('abort', onAbort);
    };
    socket.on('error', onError);
    socket.on('connect', onConnect);
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** Connects and negotiates (`list`: only NBD_OPT_LIST, then the caller hangs up). */
export async function openConnection(
  target: NbdConnectTarget,
  options: NbdClientOptions,
  list: boolean,
): Promise<{
  socket: net.Socket;
  negotiated: Negotiated;
  exportName: string;
  router: ReadRouter | undefined;
}> {
  const { transport, exportName, tls } = resolveTarget(target, options);
  const ac = new AbortController();
  // connectTimeout 0 or Infinity: no time limit.
  const timeoutMs = options.connectTimeout ?? 30_000;
  const timer =
    timeoutMs > 0 && Number.isFinite(timeoutMs)
      ? setTimeout(() => {
          ac.abort(
            new NbdConnectionError(
              'ERR_VMDISK_NBD_TIMEOUT',
              `the NBD connection and handshake did not finish in ${timeoutMs} ms`,
            ),
          );
        }, timeoutMs)
      : undefined;
  const userSignal = options.signal;
  const onUserAbort = () =>
    ac.abort(
      new NbdConnectionError(
        'ERR_VMDISK_NBD_ABORTED',
        'the NBD connect was aborted',
        userSignal?.reason,
      ),
    );
  if (userSignal?.aborted) onUserAbort();
  else userSignal?.addEventListener('abort', onUserAbort, { once: true });
  try {
    // Plain connections read through onread (TLS sockets decrypt into 'data' events).
    const router = tls ? undefined : new ReadRouter();
    const socket = await connectSocket(transport, ac.signal, router);
    if (!('path' in transport)) socket.setNoDelay(true);
    try {
      options.configureSocket?.(socket);
    } catch (err) {
      socket.destroy();
      throw new NbdConnectionError(
        'ERR_VMDISK_NBD_CONFIGURE_SOCKET',
        `configuring the socket failed: ${String(err)}`,
        err,
      );
    }
    const contexts: string[] = [];
    if (options.baseAllocation !== false) contexts.push(META_CONTEXT_BASE_ALLOCATION);
    if (options.allocationDepth) contexts.push(META_CONTEXT_ALLOCATION_DEPTH);
    for (const c of options.metaContexts ?? []) if (!contexts.includes(c)) contexts.push(c);
    const negotiateOptions: Parameters<typeof negotiate>[1] = {
      exportName,
      structuredReplies: options.structuredReplies !== false,
      extendedHeaders: options.extendedHeaders !== false && options.structuredReplies !== false,
      metaContexts: contexts,
      signal: ac.signal,
    };
    if (tls) negotiateOptions.tls = tls;
    if (!('path' in transport)) negotiateOptions.host = transport.host;
    if (list) negotiateOptions.list = true;
    if (router) negotiateOptions.router = router;
    const negotiated = await negotiate(socket, negotiateOptions);
    return { socket, negotiated, exportName, router };
  } finally {
    clearTimeout(timer);
    userSignal?.removeEventListener('abort', onUserAbort);
  }
}
