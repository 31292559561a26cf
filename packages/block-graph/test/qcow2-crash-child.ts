// Child process of qcow2-crash.test.ts: opens an image and does batches of random writes,
// zero writes and discards, each batch followed by a flush, until it is killed. Every batch
// is announced on stdout before it starts, every completed flush after it completes
// (synchronous writes to the pipe, so nothing announced is lost when the process dies).
//
// argv: image path, backing raw path or '-', seed, l2 cache bytes or '-'

import { writeSync } from 'node:fs';
import { openQcow2 } from '../src/drivers/qcow2/image.ts';
import { FsFile, pattern, rng } from './qcow2-helpers.ts';

const [path, backingPath, seedArg, l2Arg] = process.argv.slice(2) as [
  string,
  string,
  string,
  string,
];
const say = (o: unknown) => writeSync(1, `${JSON.stringify(o)}\n`);

const file = await FsFile.open(path);
const backingFile = backingPath !== '-' ? await FsFile.open(backingPath, { readOnly: true }) : null;
const img = await openQcow2(file, {
  backing: backingFile
    ? { read: (b, o) => backingFile.read(b, o), size: () => backingFile.size() }
    : null,
  ...(l2Arg !== '-' ? { l2CacheSize: Number(l2Arg) } : {}),
});
const size = img.virtualSize;
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
        ? img.write(pattern(new Uint8Array(o.len), o.seed), o.off)
        : o.k === 'z'
          ? img.writeZeroes(o.off, o.len, { mayUnmap: o.unmap ?? false })
          : img.discard(o.off, o.len),
    ),
  );
  await img.flush();
  say({ t: 'flushed', n });
}
