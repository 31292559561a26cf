// The metrics endpoint of `vm-disk serve --metrics`: HTTP on a TCP address or a unix
// socket, GET /metrics in the Prometheus text format, GET /healthz answering whether the
// daemon is serving (200 "serving", or 503 once it is stopping). Anything else is a 404.
import { unlink } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { VmDiskError } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { SocketAddress } from '../options/serve-options.ts';
import { type MetricsSource, metricsRegistry } from './collect.ts';

export interface MetricsServer {
  /** Where it listens: host and port (the port bound, for port 0), or the socket path. */
  readonly address: { host: string; port: number } | { path: string };
  close(): Promise<void>;
}

export async function startMetricsServer(
  source: MetricsSource,
  addr: SocketAddress,
  log: Logger,
): Promise<MetricsServer> {
  const registry = metricsRegistry(source);
  const answer = (res: ServerResponse, status: number, type: string, body: string) => {
    res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) });
    res.end(body);
  };
  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      answer(res, 405, 'text/plain', 'only GET\n');
    } else if (path === '/metrics') {
      answer(res, 200, registry.contentType, await registry.metrics());
    } else if (path === '/healthz' || path === '/health') {
      const serving = source.serving;
      answer(res, serving ? 200 : 503, 'text/plain', serving ? 'serving\n' : 'stopping\n');
    } else {
      answer(res, 404, 'text/plain', 'not found: /metrics, /healthz\n');
    }
  };
  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      log.error({ event: 'metrics-error', err }, 'metrics endpoint failed');
      if (!res.headersSent) answer(res, 500, 'text/plain', 'internal error\n');
      else res.destroy();
    });
  });
  const where = addr.type === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
  const port = addr.type === 'inet' ? Number(addr.port) : 0;
  if (addr.type === 'inet' && !(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    throw new VmDiskError('ERR_VMDISK_APP_BAD_OPTION', `'${addr.port}' is not a valid port`);
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) =>
      reject(
        new VmDiskError(
          'ERR_VMDISK_APP_METRICS_LISTEN',
          `cannot listen on ${where}: ${err.message}`,
          {
            cause: err,
          },
        ),
      ),
    );
    if (addr.type === 'unix') server.listen(addr.path, resolve);
    else server.listen(port, addr.host, resolve);
  });
  const bound = server.address() as AddressInfo | string;
  const address =
    typeof bound === 'string' ? { path: bound } : { host: bound.address, port: bound.port };
  log.info({ event: 'metrics-listening', address }, 'metrics endpoint listening');
  return {
    address,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (addr.type === 'unix') await unlink(addr.path).catch(() => {});
    },
  };
}
