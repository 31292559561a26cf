// Opening an image together with the backing chain its headers name (what QEMU does when
// no `backing` option is given): each backing file is resolved relative to the image that
// names it, opened read-only, as qcow2 or raw (the backing format extension, or probed from
// the magic). A chain that comes back to an image already in it, or deeper than
// MAX_CHAIN_DEPTH, is refused with BACKING_CYCLE.

import { dirname, isAbsolute, resolve } from 'node:path';
import { badOption, Qcow2Error, Qcow2ErrorCode } from '../../errors.ts';
import { QCOW2_MAGIC } from './header.ts';
import { openQcow2, type Qcow2Image, type Qcow2OpenOptions } from './image.ts';
import type { Qcow2BackingReader, Qcow2File } from './types.ts';

export const MAX_CHAIN_DEPTH = 64;

/** Opens files for the chain: the path as resolved, read-only for every backing file. */
export type Qcow2FileOpener = (
  path: string,
  readOnly: boolean,
) => Promise<Qcow2File & { close(): Promise<void> }>;

export interface Qcow2Chain {
  /** The top image. */
  image: Qcow2Image;
  /** Every file opened, top first (close them after closing the image). */
  files: Array<{ path: string; format: string; close(): Promise<void> }>;
  /** Closes the top image, then every file. */
  close(): Promise<void>;
}

function rawReader(file: Qcow2File): Qcow2BackingReader {
  return { read: (b, o) => file.read(b, o), size: () => file.size() };
}

async function probe(file: Qcow2File): Promise<string> {
  const b = new Uint8Array(4);
  const n = await file.read(b, 0);
  if (n === 4 && new DataView(b.buffer).getUint32(0) === QCOW2_MAGIC) return 'qcow2';
  return 'raw';
}

/**
 * Opens the qcow2 image at `path` and its whole backing chain. `options` apply to the top
 * image (its `backing` must not be given: the chain provides it).
 */
export async function openQcow2Chain(
  path: string,
  opener: Qcow2FileOpener,
  options: Omit<Qcow2OpenOptions, 'backing'> = {},
): Promise<Qcow2Chain> {
  const opened: Qcow2Chain['files'] = [];
  const closeAll = async () => {
    for (const f of opened) await f.close().catch(() => {});
  };
  try {
    const seen = new Set<string>();
    // Walk down the chain collecting (path, format); then open images bottom-up.
    const levels: Array<{ path: string; format: string; file: Qcow2File }> = [];
    let cur = resolve(path);
    let fmt = 'qcow2';
    for (let depth = 0; ; depth++) {
      if (seen.has(cur)) {
        throw new Qcow2Error(
          Qcow2ErrorCode.BACKING_CYCLE,
          `backing chain loops: '${cur}' is already in the chain`,
        );
      }
      if (depth >= MAX_CHAIN_DEPTH) {
        throw new Qcow2Error(
          Qcow2ErrorCode.BACKING_CYCLE,
          `backing chain deeper than ${MAX_CHAIN_DEPTH}`,
        );
      }
      seen.add(cur);
      const file = await opener(cur, depth > 0 || (options.readOnly ?? false));
      opened.push({ path: cur, format: fmt, close: () => file.close() });
      if (depth > 0 && fmt === 'raw') {
        levels.push({ path: cur, format: fmt, file });
        break;
      }
      if (fmt !== 'qcow2')
        throw badOption(`backing format '${fmt}' of '${cur}' is not qcow2 or raw`);
      levels.push({ path: cur, format: fmt, file });
      // Peek at the header for the backing file name.
      const probeImg = await openQcow2(file, { readOnly: true, backing: null });
      const h = probeImg.header;
      await probeImg.close();
      if (h.backingFile === null) break;
      const next = isAbsolute(h.backingFile) ? h.backingFile : resolve(dirname(cur), h.backingFile);
      cur = next;
      const nextFile = h.backingFormat;
      fmt = nextFile ?? '';
      if (!fmt) {
        // Probe: open it to look at the magic (it is opened again below by the loop).
        const f = await opener(next, true);
        try {
          fmt = await probe(f);
        } finally {
          await f.close();
        }
      }
    }
    let below: Qcow2BackingReader | null = null;
    let top: Qcow2Image | null = null;
    for (let i = levels.length - 1; i >= 0; i--) {
      const l = levels[i]!;
      if (l.format === 'raw') {
        below = rawReader(l.file);
        continue;
      }
      const img = await openQcow2(
        l.file,
        i === 0 ? { ...options, backing: below } : { readOnly: true, backing: below },
      );
      below = img;
      if (i === 0) top = img;
    }
    const image = top!;
    return {
      image,
      files: opened,
      close: async () => {
        try {
          await image.close();
        } finally {
          await closeAll();
        }
      },
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}
