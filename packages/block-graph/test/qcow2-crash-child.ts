// Child process of qcow2-crash.test.ts: opens an image and does batches of random writes,
// zero writes and discards, each batch followed by a flush, until it is killed. Every batch
// is announced on stdout before it starts, every completed flush after it completes
// (synchronous writes to the pipe, so nothing announced is lost when the process dies).
//
// argv: image path, backing raw path or '-', seed, l2 cache bytes or '-', 'core' or 'graph'
// (core: Qcow2Image directly, whose write() is the graph's map -> data -> commit loop;
// graph: through a BlockGraph node and backend, the backing file from the image header)

import { writeSync } from 'node:fs';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { qcow2Driver } from '../src/drivers/qcow2/qcow2.ts';
import { BlockGraph } from '../src/index.ts';
import { ImageFile, pattern, rng } from './qcow2-helpers.ts';

const [path, backingPath, seedArg, l2Arg, mode] = process.argv.slice(2) as [
  string,
  string,
  string,
  string,
  string,
];
const say = (o: unknown) => writeSync(1, `${JSON.stringify(o)}\n`);

interface Target {
  size: number;
  write(buf: Uint8Array, off: number): Promise<void>;
  zero(off: number, len: number, unmap: boolean): Promise<void>;
  discard(off: number, len: number): Promise<void>;
  flush(): Promise<void>;
}

async function core(): Promise<Target> {
  const file = await ImageFile.open(path);
  const backingFile =
    backingPath !== '-' ? await ImageFile.open(backingPath, { readOnly: true }) : null;
  const img = await openQcow2(file, {
    backing: backingFile
      ? { read: (b, o) => backingFile.read(b, o), size: () => backingFile.size() }
      : null,
    ...(l2Arg !== '-' ? { l2CacheSize: Number(l2Arg) } : {}),
  });
  return {
    size: img.virtualSize,
    write: (b, o) => img.write(b, o),
    zero: (o, l, unmap) => img.writeZeroes(o, l, { mayUnmap: unmap }),
    discard: (o, l) => img.discard(o, l),
    flush: () => img.flush(),
  };
}

async function graph(): Promise<Target> {
  const g = new BlockGraph({ drivers: [qcow2Driver] });
  await g.add({
    driver: 'qcow2',
    'node-name': 'disk',
    discard: 'unmap',
    file: { driver: 'file', filename: path },
    ...(l2Arg !== '-' ? { 'l2-cache-size': Number(l2Arg) } : {}),
  });
  const b = await g.createBackend('disk', { write: true });
  return {
    size: b.size(),
    write: (buf, o) => b.write(o, buf),
    zero: (o, l, unmap) => b.writeZeroes(o, l, { noHole: !unmap }),
    discard: (o, l) => b.trim(o, l),
    flush: () => b.flush(),
  };
}

const t = mode === 'graph' ? await graph() : await core();
const size = t.size;
const r = rng(Number(seedArg));
say({ t: 'ready' });
for (let n = 0; ; n++) {
  const ops: Array<{ k: string; off: number; len: number; seed: number; unmap?: boolean }> = [];
  const count = 1 + Math.floor(r() * 12);
  for (let i = 0; i < count; i++) {
    const len = 1 + Math.floor(r() * (r() < 0.7 ? 8000 : 150_000));
    const off = Math.floor(r() * (size - len));
    if (ops.some((o) => off < o.off + o.len && o.off < off + len)) continue;
    const x = r();
    ops.push({
      k: x < 0.7 ? 'w' : x < 0.85 ? 'z' : 'd',
      off,
      len,
      seed: n * 100 + i + 1,
      unmap: r() < 0.5,
    });
  }
  say({ t: 'batch', n, ops });
  await Promise.all(
    ops.map((o) =>
      o.k === 'w'
        ? t.write(pattern(new Uint8Array(o.len), o.seed), o.off)
        : o.k === 'z'
          ? t.zero(o.off, o.len, o.unmap ?? false)
          : t.discard(o.off, o.len),
    ),
  );
  await t.flush();
  say({ t: 'flushed', n });
}
