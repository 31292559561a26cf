// An iothread's worker: its own event loop and NBD server (never listening), serving the
// connections the main thread hands off (their fds) on the exports it was told of.
import * as net from 'node:net';
import { parentPort } from 'node:worker_threads';
import { socketSender } from '@vmdisk/engine';
import { NbdServer } from '@vmdisk/nbd';
import { ForwardTarget, forwardedError } from './forward-target.ts';
import { LocalReads } from './local-reads.ts';
import type { ForwardExtent, ForwardOp, FromWorker, ToWorker } from './messages.ts';

const port = parentPort;
if (port === null) throw new Error('the iothread worker runs in a worker thread');

const post = (m: FromWorker): void => port.postMessage(m);

// READs of the file's cached bytes go from the file to the socket (LocalReads.fileRange).
const server = new NbdServer({
  fileSender: socketSender,
});
/** The worker server's connection number -> the main thread's. */
const mainConn = new Map<number, number>();
/** The main thread's number -> the socket, to disconnect it. */
const sockets = new Map<number, net.Socket>();
const pending = new Map<
  number,
  { resolve: (e: ForwardExtent[] | undefined) => void; reject: (e: Error) => void }
>();
let nextReq = 1;
/** Each export's fast-path reads. */
const locals = new Map<string, LocalReads>();

const forward = (name: string, req: ForwardOp): Promise<ForwardExtent[] | undefined> =>
  new Promise((resolve, reject) => {
    const id = nextReq++;
    pending.set(id, { resolve, reject });
    post({ t: 'io', id, name, req });
  });

server.on('disconnect', (c) => {
  const conn = mainConn.get(c.id);
  if (conn === undefined) return;
  mainConn.delete(c.id);
  sockets.delete(conn);
  post({ t: 'closed', conn });
});
server.on('error', (c) =>
  post({
    t: 'log',
    level: 'warn',
    msg: 'NBD client error',
    data: {
      event: 'nbd-client-error',
      export: c.export,
      error: c.error.message,
      code: c.error.code,
    },
  }),
);

port.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'reply': {
      const p = pending.get(m.id);
      pending.delete(m.id);
      if (m.error !== undefined) p?.reject(forwardedError(m.error));
      else p?.resolve(m.extents);
      return;
    }
    case 'export-add': {
      const e = m.export;
      const local = new LocalReads();
      locals.set(e.name, local);
      server.addExport({
        name: e.name,
        description: e.description,
        writable: e.writable,
        allocationDepth: e.allocationDepth,
        target: new ForwardTarget(e.name, e.size, e.blockSize, forward, local),
      });
      return;
    }
    case 'export-del':
      // The main thread removes the export once the connections it handed off are gone.
      server.removeExport(m.name, 'hard').catch(() => {});
      void locals.get(m.name)?.close();
      locals.delete(m.name);
      return;
    case 'fast-on':
      locals.get(m.name)?.start(m.file);
      return;
    case 'fast-off': {
      const name = m.name;
      const local = locals.get(name);
      const done = () => post({ t: 'fast-off-done', name });
      if (local === undefined) done();
      else void local.stop().then(done);
      return;
    }
    case 'adopt': {
      const socket = new net.Socket({ fd: m.fd, readable: true, writable: true });
      const id = server.adopt(socket, m.name, m.state);
      if (id === undefined) {
        post({ t: 'closed', conn: m.conn });
        return;
      }
      mainConn.set(id, m.conn);
      sockets.set(m.conn, socket);
      return;
    }
    case 'destroy':
      sockets.get(m.conn)?.destroy();
      return;
  }
});
