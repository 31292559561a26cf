// An embedder's NBD server, for serve.bench.ts: @vmdisk/nbd's NbdServer exporting a raw
// file as `disk` on a unix socket through FileTarget, with the file read and written by
// node:fs (`fs`, libuv's thread pool) or by an @vmdisk/engine EngineFile (`engine`,
// io_uring). Not a benchmark itself (no .bench.ts): serve.bench.ts runs it as a server.
// Usage: node embedded-nbd.ts fs|engine IMAGE SOCKET
import { openEngine } from '@vmdisk/engine';
import { FileTarget, NbdServer } from '@vmdisk/nbd';

const [io, image, sock] = process.argv.slice(2);
if ((io !== 'fs' && io !== 'engine') || !image || !sock) {
  throw new Error('usage: embedded-nbd.ts fs|engine IMAGE SOCKET');
}
const target =
  io === 'engine'
    ? await FileTarget.fromFile(await (await openEngine()).openFile(image))
    : await FileTarget.open(image);
const server = new NbdServer();
server.addExport({ name: 'disk', target, writable: true });
await server.listen({ path: sock });
process.on('SIGTERM', () => {
  void server.close().then(() => process.exit(0));
});
