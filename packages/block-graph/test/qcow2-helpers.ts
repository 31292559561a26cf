// Test helpers for the qcow2 tests: a real file behind the Qcow2File interface (the engine),
// and deterministic data (qemu-tools.ts runs qemu-img and qemu-io).

import { type EngineFile, sharedEngine } from '@vmdisk/engine';
import { fillPattern } from '../../../tools/test-support/src/index.ts';
import type { Qcow2File } from '../src/drivers/qcow2/types.ts';

/** A Qcow2File over a real file, through @vmdisk/engine (this thread's shared engine). */
export class ImageFile implements Qcow2File {
  readonly path: string;
  readonly #f: EngineFile;
  constructor(path: string, f: EngineFile) {
    this.path = path;
    this.#f = f;
  }
  static async open(
    path: string,
    opts: { readOnly?: boolean; create?: boolean } = {},
  ): Promise<ImageFile> {
    const engine = await sharedEngine('auto');
    const f = await engine.openFile(path, {
      readOnly: opts.readOnly ?? false,
      create: opts.create ?? false,
    });
    return new ImageFile(path, f);
  }
  read(buf: Uint8Array, offset: number): Promise<number> {
    return this.#f.read(buf, offset);
  }
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.#f.write(buf, offset);
  }
  size(): Promise<number> {
    return this.#f.size();
  }
  truncate(size: number): Promise<void> {
    return this.#f.truncate(size);
  }
  flush(): Promise<void> {
    return this.#f.fdatasync();
  }
  discard(offset: number, length: number): Promise<void> {
    return this.#f.fallocate('punch-hole', offset, length);
  }
  close(): Promise<void> {
    return this.#f.close();
  }
}

/** A deterministic pseudo-random generator (xorshift32). */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Fills `buf` with a pattern that depends on `seed` and the position. */
export const pattern = fillPattern;

/** First differing offset of two buffers, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}
