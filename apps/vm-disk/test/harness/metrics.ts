// `vm-disk serve --metrics` for tests: a daemon serving a qcow2 image over an NBD unix
// socket with its metrics endpoint on 127.0.0.1 (a port the kernel picks), and reading it.
import { request } from 'node:http';
import { run, type useScratch, waitFor } from './daemon.ts';

type Scratch = ReturnType<typeof useScratch>;

export interface MetricsDaemon {
  nbd: string;
  port: number;
}

/** Starts vm-disk serving d0 (qcow2 on f0) as export e0, with --metrics on a free port. */
export async function serveWithMetrics(scratch: Scratch, size = '64M'): Promise<MetricsDaemon> {
  const img = scratch.path('disk.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, size]);
  const nbd = scratch.path('nbd.sock');
  const p = await scratch.serve([
    '--blockdev',
    `driver=file,node-name=f0,filename=${img}`,
    '--blockdev',
    'driver=qcow2,node-name=d0,file=f0',
    '--nbd-server',
    `addr.type=unix,addr.path=${nbd}`,
    '--export',
    'type=nbd,id=e0,node-name=d0,writable=on',
    '--metrics',
    'addr.type=inet,addr.host=127.0.0.1,addr.port=0',
  ]);
  let port = 0;
  await waitFor('the metrics endpoint', () => {
    const line = p
      .stderr()
      .split('\n')
      .find((l) => l.includes('"event":"metrics-listening"'));
    if (line) port = (JSON.parse(line) as { address: { port: number } }).address.port;
    return port > 0;
  });
  return { nbd, port };
}

/** GET http://127.0.0.1:port/path (or on a unix socket): status, content type and body. */
export function httpGet(
  where: { port: number } | { socketPath: string },
  path: string,
): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ ...where, host: '127.0.0.1', path, method: 'GET' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        body += d;
      });
      res.on('end', () =>
        resolve({
          status: res.statusCode ?? 0,
          type: String(res.headers['content-type']),
          body,
        }),
      );
    });
    req.on('error', reject);
    req.end();
  });
}

/** The value of the sample `series` (name and labels, as printed) in a text exposition. */
export function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}
