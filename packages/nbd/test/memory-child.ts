// A server alone in its process, for tests that measure its resident memory: serves
// FILE (argv[2]) as export "disk" on 127.0.0.1 and prints the port. argv[3]: the
// request memory budget in bytes (default: the server's). Each line "stats" on stdin is
// answered with a line of JSON: the budget, the bytes of it in use, the connections.
import { createInterface } from 'node:readline';
import { FileTarget, NbdServer } from '../src/index.ts';

const [image, budget] = process.argv.slice(2);
const target = await FileTarget.open(image!, { readOnly: true });
const server = new NbdServer(budget ? { requestMemoryBudget: Number(budget) } : {});
server.addExport({ name: 'disk', target });
const addr = await server.listen({ host: '127.0.0.1', port: 0 });
if (!('port' in addr)) throw new Error('expected a TCP address');
process.stdout.write(`${addr.port}\n`);
createInterface({ input: process.stdin }).on('line', (line) => {
  if (line === 'stats') {
    const stats = { ...server.requestMemory, connections: server.connectionCount };
    process.stdout.write(`${JSON.stringify(stats)}\n`);
  }
});
