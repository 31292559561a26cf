// The daemon's character devices, as qemu-storage-daemon's (--chardev, QMP chardev-add,
// chardev-remove, query-chardev, /chardevs in QOM): listening sockets (unix or inet,
// server=on) and null. A monitor (--monitor chardev=ID) is the frontend of one: each
// connection is a QMP session. A socket without a frontend holds its connections unread,
// as QEMU's does.
import { lstatSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import { listenUnixSocket } from '@vmdisk/nbd';
import { QmpError, type QmpMonitor } from './qmp/monitor.ts';

/** QEMU's SocketAddress (flat) of a listening socket chardev. */
export type ChardevAddress =
  | { type: 'unix'; path: string }
  | { type: 'inet'; host: string; port: string };

export type ChardevBackend = { type: 'socket'; addr: ChardevAddress } | { type: 'null' };

interface Chardev {
  id: string;
  backend: ChardevBackend;
  server: net.Server | undefined;
  connections: Set<net.Socket>;
  /** The monitor this is the frontend of (pretty-printed replies or not). */
  monitor: { pretty: boolean } | undefined;
}

/** ChardevInfo (query-chardev). */
export interface ChardevInfo {
  label: string;
  filename: string;
  'frontend-open': boolean;
}

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ENOTDIR: 'Not a directory',
};

function errnoText(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  return (code && ERRNO_TEXT[code]) ?? (e as Error).message;
}

export class ChardevRegistry {
  private readonly chardevs = new Map<string, Chardev>();

  constructor(private readonly monitor: QmpMonitor) {}

  /**
   * Adds a chardev (listening already when this resolves); `monitor` makes it a QMP
   * monitor's. Refusals in QEMU's words (chardev-add prefixes its own).
   */
  async add(id: string, backend: ChardevBackend, monitor?: { pretty: boolean }): Promise<void> {
    if (this.chardevs.has(id)) {
      throw new QmpError('GenericError', `Chardev with id '${id}' already exists`);
    }
    const c: Chardev = { id, backend, server: undefined, connections: new Set(), monitor };
    // Taken before listening: a second add of the same id waits for nothing.
    this.chardevs.set(id, c);
    if (backend.type === 'null') return;
    const server = net.createServer((socket) => this.accept(c, socket));
    try {
      if (backend.addr.type === 'unix') await listenUnixSocket(server, backend.addr.path);
      else await listenInet(server, backend.addr);
    } catch (e) {
      this.chardevs.delete(id);
      server.close();
      const where =
        backend.addr.type === 'unix'
          ? backend.addr.path
          : `${backend.addr.host}:${backend.addr.port}`;
      throw new QmpError('GenericError', `Failed to bind socket to ${where}: ${errnoText(e)}`);
    }
    c.server = server;
    if (backend.addr.type === 'inet') {
      // Port 0 asked for any: the one given is the chardev's from now on.
      const bound = server.address() as net.AddressInfo;
      c.backend = { type: 'socket', addr: { ...backend.addr, port: String(bound.port) } };
    }
  }

  private accept(c: Chardev, socket: net.Socket): void {
    c.connections.add(socket);
    socket.on('close', () => c.connections.delete(socket));
    socket.on('error', () => {});
    if (c.monitor) this.monitor.attach(socket, c.monitor.pretty);
    else socket.pause();
  }

  has(id: string): boolean {
    return this.chardevs.has(id);
  }

  /** chardev-remove: refused for a monitor's (busy); its socket file goes with it. */
  async remove(id: string): Promise<void> {
    const c = this.chardevs.get(id);
    if (!c) throw new QmpError('GenericError', `Chardev '${id}' not found`);
    if (c.monitor) throw new QmpError('GenericError', `Chardev '${id}' is busy`);
    this.chardevs.delete(id);
    await this.closeOne(c);
  }

  private async closeOne(c: Chardev): Promise<void> {
    for (const s of c.connections) s.destroy();
    const server = c.server;
    if (!server) return;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    if (c.backend.type === 'socket' && c.backend.addr.type === 'unix') {
      const path = c.backend.addr.path;
      try {
        if (lstatSync(path).isSocket()) unlinkSync(path);
      } catch {
        // Gone already.
      }
    }
  }

  /** query-chardev. */
  query(): ChardevInfo[] {
    return [...this.chardevs.values()].map((c) => ({
      label: c.id,
      filename: filename(c),
      'frontend-open': c.monitor !== undefined,
    }));
  }

  /** The chardevs, for QOM (/chardevs/ID). */
  list(): { id: string; backend: ChardevBackend; connected: boolean }[] {
    return [...this.chardevs.values()].map((c) => ({
      id: c.id,
      backend: c.backend,
      connected: c.connections.size > 0,
    }));
  }

  /** Stops listening on every socket (the monitor closes its own sessions). */
  async close(): Promise<void> {
    const all = [...this.chardevs.values()];
    this.chardevs.clear();
    await Promise.all(all.map((c) => this.closeOne(c)));
  }
}

/** QEMU's chardev filename: `unix:PATH,server=on`, `disconnected:` while nobody is. */
function filename(c: Chardev): string {
  if (c.backend.type === 'null') return 'null';
  const a = c.backend.addr;
  const where = a.type === 'unix' ? `unix:${a.path}` : `tcp:${a.host}:${a.port}`;
  return `${c.connections.size > 0 ? '' : 'disconnected:'}${where},server=on`;
}

function listenInet(server: net.Server, addr: { host: string; port: string }): Promise<void> {
  const port = Number(addr.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    return Promise.reject(new Error(`'${addr.port}' is not a valid port`));
  }
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: addr.host, port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
}
