// Compression of clusters on worker threads (as QEMU compresses on its thread pool): one
// worker per CPU, each running zlib's (or zstd's) one-shot compressor. A message costs far
// less than node:zlib's asynchronous stream, whose per-call machinery took more main-thread
// time than the compression itself. Workers keep the process alive only while they work.
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

const WORKER = `
const { parentPort } = require('node:worker_threads');
const zlib = require('node:zlib');
parentPort.on('message', ({ id, zstd, data, options }) => {
  try {
    const out = zstd ? zlib.zstdCompressSync(data) : zlib.deflateRawSync(data, options);
    // Moved back without a copy when the result owns its whole ArrayBuffer (never a pooled
    // one: pool slices are smaller than the pool).
    const own = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength;
    const copy = own ? out : new Uint8Array(out);
    parentPort.postMessage({ id, out: copy }, [copy.buffer]);
  } catch (e) {
    parentPort.postMessage({ id, error: String(e && e.message || e) });
  }
});
`;

interface Pending {
  resolve(out: Uint8Array): void;
  reject(err: Error): void;
}

interface PoolWorker {
  worker: Worker;
  busy: number;
}

let workers: PoolWorker[] | undefined;
const pending = new Map<number, Pending>();
let seq = 0;

function pool(): PoolWorker[] {
  if (!workers) {
    workers = Array.from({ length: Math.max(1, availableParallelism()) }, () => {
      const w: PoolWorker = { worker: new Worker(WORKER, { eval: true }), busy: 0 };
      w.worker.on('message', (m: { id: number; out?: Uint8Array; error?: string }) => {
        if (--w.busy === 0) w.worker.unref();
        const p = pending.get(m.id);
        pending.delete(m.id);
        if (m.error !== undefined) p?.reject(new Error(m.error));
        else p?.resolve(m.out!);
      });
      // After the listener is added (adding it refs the worker's port again).
      w.worker.unref();
      return w;
    });
  }
  return workers;
}

/** Compresses `data` on the least busy worker (zlib raw deflate with `options`, or zstd). */
export function compressOnPool(
  data: Uint8Array,
  zstd: boolean,
  options: Readonly<Record<string, number>>,
): Promise<Uint8Array> {
  const ws = pool();
  let w = ws[0]!;
  for (const x of ws) if (x.busy < w.busy) w = x;
  const id = ++seq;
  // Shared memory (convert's buffers) is read by the worker in place: the caller keeps the
  // bytes untouched until the promise settles. Otherwise a copy of the view alone (cloning
  // a view would clone its whole ArrayBuffer; and Buffer#slice does not copy), moved there.
  const shared = data.buffer instanceof SharedArrayBuffer;
  const sent = shared ? data : new Uint8Array(data);
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    if (w.busy++ === 0) w.worker.ref();
    w.worker.postMessage(
      { id, zstd, data: sent, options },
      shared ? [] : [sent.buffer as ArrayBuffer],
    );
  });
}
