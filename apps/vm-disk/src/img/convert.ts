// `vm-disk convert`, as `qemu-img convert`: copies an image into a new (or, with -n, an
// existing) one through the block graph, so that any node the graph opens is a source or
// a target (files, nbd:// URIs, --image-opts).
//
// As qemu-img: the source's block status decides what is read (zero and unallocated
// ranges never are); zeros are skipped on a target that reads as zeros already (a new
// image, or --target-is-zero) and written as zeros otherwise; data is scanned for zero
// runs of -S bytes (aligned to the target's cluster), which are treated as zeros; -c
// writes qcow2 compressed clusters; -B makes a target over a backing file, copying only
// what the source's top layer holds. -m requests run at once; without -W they write in
// order.
import type { BlockBackend, Extent } from '@vmdisk/block-graph';
import { pageAlignedBuffer } from '@vmdisk/engine';
import { BadOptionError, ImageCommandError, UsageError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { imgArgs, intArg } from './args.ts';
import { createImage } from './create.ts';
import { ExtentCursor } from './extents.ts';
import { checkCacheMode, imageGraph, nbdUri, openImage, sizeArg } from './open.ts';
import { ImgProgress } from './progress.ts';

/** Bytes one request copies (qemu-img's buffer: 2 MiB). */
const CHUNK = 2 << 20;
const MAX_SPARSE = 16 << 20;
const ZERO = Buffer.alloc(CHUNK);

/** Whether buf holds only zeros (memcmp against a zero buffer). */
function isZero(buf: Uint8Array): boolean {
  for (let at = 0; at < buf.length; at += CHUNK) {
    const n = Math.min(CHUNK, buf.length - at);
    if (!Buffer.from(buf.buffer, buf.byteOffset + at, n).equals(ZERO.subarray(0, n))) return false;
  }
  return true;
}

/** Whether words[from, to) are all zeros (left at the first non-zero word). */
function wordsZero(words: Int32Array, from: number, to: number): boolean {
  for (let w = from; w < to; w++) if (words[w] !== 0) return false;
  return true;
}

/**
 * The runs of `data` that are whole zero grains and the runs that are not (grains aligned
 * at `offset` in the image, the first and last possibly shorter): the end of each run in
 * `data`, the runs alternating from the first one's kind (`firstZero`). One pass over
 * 32-bit words where aligned, a data grain left at its first non-zero word, nothing
 * allocated per grain: per grain a boolean array and a second pass over it cost ~100 ns
 * a grain, 25 ms of CPU for a GiB of 4 KiB grains.
 */
export function zeroRuns(
  data: Uint8Array,
  offset: number,
  grain: number,
): { firstZero: boolean; ends: number[] } {
  const n = data.length;
  // Every grain boundary is a word boundary when these are: the word path for all of them.
  const aligned = data.byteOffset % 4 === 0 && n % 4 === 0 && grain % 4 === 0 && offset % 4 === 0;
  const words = aligned ? new Int32Array(data.buffer, data.byteOffset, n / 4) : null;
  const ends: number[] = [];
  let firstZero = false;
  let current: boolean | undefined;
  // Grain ends found by adding, not by a remainder per grain (offsets past 2^31 make it a
  // floating-point one).
  for (let at = 0, to = Math.min(n, grain - (offset % grain)); at < n; ) {
    const zero = words ? wordsZero(words, at / 4, to / 4) : isZero(data.subarray(at, to));
    if (current === undefined) firstZero = zero;
    else if (zero !== current) ends.push(at);
    current = zero;
    at = to;
    to = Math.min(n, to + grain);
  }
  ends.push(n);
  return { firstZero, ends };
}

export interface ConvertOptions {
  /** -S: the shortest zero run treated as a hole (0: write everything). */
  minSparse: number;
  compress: boolean;
  /** The target has a backing file (-B): only the source's top layer is copied. */
  targetHasBacking: boolean;
  /** The target reads as zeros where nothing is written. */
  zeroInit: boolean;
  parallel: number;
  outOfOrder: boolean;
  /** A cache mode bypasses the page cache (-t/-T none or directsync): aligned buffers. */
  direct?: boolean;
  onProgress?: (done: number, total: number) => void;
}

/** One request: a window of the source and its block status within it. */
interface Item {
  offset: number;
  length: number;
  extents: Extent[];
  /** Settles when the previous window's write is done (the order of writes without -W). */
  before?: Promise<void>;
  /** Lets the next window write. */
  release?: () => void;
}

/** Copies src into dst (both open; dst at least as large). */
export async function copyImage(
  src: BlockBackend,
  dst: BlockBackend,
  o: ConvertOptions,
): Promise<void> {
  const size = src.size();
  const unit = o.compress ? dst.compressedUnit : undefined;
  if (o.compress && unit === undefined)
    throw new ImageCommandError('Compression not supported for this file format');
  const chunk = unit ?? CHUNK;
  // Zero runs are found in blocks of -S bytes, and no smaller than the target's cluster.
  const grain = Math.max(o.minSparse, dst.compressedUnit ?? 512);
  const status = new ExtentCursor(src, size);
  let next = 0;
  let done = 0;
  let failed: unknown;
  let writeTail: Promise<void> = Promise.resolve();

  // Windows are taken one at a time (the cursor moves forward only), in order: at once
  // while the status read ahead covers them (most windows), else after the windows before.
  let taking: Promise<unknown> | undefined;
  const take = (): Item | undefined | Promise<Item | undefined> => {
    if (taking === undefined) {
      const item = takeAhead();
      if (item !== null) return item;
    }
    const p = (taking ?? Promise.resolve()).then(takeNext);
    const settled = p.then(
      () => {},
      () => {},
    );
    taking = settled;
    void settled.then(() => {
      if (taking === settled) taking = undefined;
    });
    return p;
  };
  const window = (): { offset: number; length: number } | undefined => {
    if (next >= size || failed !== undefined) return undefined;
    const offset = next;
    const length = Math.min(chunk - (offset % chunk), size - offset);
    return { offset, length };
  };
  /** Makes the next window's item, its write slot taken now (in window order). */
  const item = (offset: number, length: number, extents: Extent[]): Item => {
    next = offset + length;
    if (o.outOfOrder) return { offset, length, extents };
    const before = writeTail;
    let release!: () => void;
    writeTail = new Promise((r) => {
      release = r;
    });
    return { offset, length, extents, before, release };
  };
  /** The next window from the status read ahead alone; null if it needs a block status call. */
  const takeAhead = (): Item | undefined | null => {
    const w = window();
    if (!w) return undefined;
    const extents: Extent[] = [];
    for (let at = w.offset; at < w.offset + w.length; ) {
      const e = status.peek(at);
      if (!e) return null;
      const n = Math.min(e.length, w.offset + w.length - at);
      extents.push({ ...e, length: n });
      at += n;
    }
    return item(w.offset, w.length, extents);
  };
  const takeNext = async (): Promise<Item | undefined> => {
    const w = window();
    if (!w) return undefined;
    const extents: Extent[] = [];
    for (let at = w.offset; at < w.offset + w.length; ) {
      const e = await status.current(at);
      const n = Math.min(e.length, w.offset + w.length - at);
      extents.push({ ...e, length: n });
      at += n;
    }
    // Nothing else took a window meanwhile (takes wait for this one): it is still next.
    return item(w.offset, w.length, extents);
  };

  const zeroes = async (offset: number, length: number): Promise<void> => {
    if (o.zeroInit || length === 0) return;
    await dst.writeZeroes(offset, length);
  };

  /** Writes data at offset, its zero runs of whole grains skipped or zeroed (-S). */
  const writeData = async (offset: number, data: Uint8Array): Promise<void> => {
    if (o.minSparse === 0) return dst.write(offset, data);
    const { firstZero, ends } = zeroRuns(data, offset, grain);
    let zero = firstZero;
    let start = 0;
    for (const end of ends) {
      if (zero) await zeroes(offset + start, end - start);
      else
        await dst.write(
          offset + start,
          end - start === data.length ? data : data.subarray(start, end),
        );
      zero = !zero;
      start = end;
    }
  };

  /**
   * What becomes of each extent of a window: read and written ('data'), written as zeros
   * without reading ('fill': -S 0), zeroed ('zero'), or left to the backing file ('skip').
   */
  const plan = (e: Extent): 'data' | 'fill' | 'zero' | 'skip' => {
    if (o.targetHasBacking && e.depth !== 1) return 'skip';
    if (!e.zero) return 'data';
    return o.minSparse === 0 ? 'fill' : 'zero';
  };

  const copyItem = async (item: Item, buf: Uint8Array): Promise<void> => {
    const kinds = item.extents.map(plan);
    const anyData = kinds.includes('data');
    let at = item.offset;
    // Reads first (in parallel with other windows), then the writes in order.
    for (const [i, e] of item.extents.entries()) {
      const part = buf.subarray(at - item.offset, at - item.offset + e.length);
      if (kinds[i] === 'data') await src.read(at, part);
      // A compressed cluster is written whole: its zeros are filled in, if it has data.
      else if (kinds[i] === 'fill' || (o.compress && anyData)) part.fill(0);
      at += e.length;
    }
    if (!o.outOfOrder) await item.before;
    if (o.compress) {
      // A whole cluster: compressed unless it is all zeros.
      const data = buf.subarray(0, item.length);
      if (anyData && !isZero(data)) await dst.writeCompressed(item.offset, data);
      else if (!kinds.every((k) => k === 'skip')) await zeroes(item.offset, item.length);
      return;
    }
    at = item.offset;
    for (const [i, e] of item.extents.entries()) {
      const part = buf.subarray(at - item.offset, at - item.offset + e.length);
      if (kinds[i] === 'data') await writeData(at, part);
      else if (kinds[i] === 'fill') await dst.write(at, part);
      else if (kinds[i] === 'zero') await zeroes(at, e.length);
      at += e.length;
    }
  };

  // One buffer for all workers, a window each, reused: one allocation (and one io_uring
  // buffer registration) for the whole copy.
  // Engine memory (page-aligned, registered with io_uring) only where O_DIRECT needs it:
  // registering tens of MiB costs more than the copies it saves. Compressing, shared memory:
  // the compression workers read the clusters in place (no copy per cluster). Otherwise
  // plain memory, page-aligned all the same: the kernel's copies from and to the page
  // cache cost less (a GiB of data: 0.06-0.08 s less CPU than a malloc'd Buffer's).
  const arena = o.direct
    ? src.allocBuffer(chunk * o.parallel)
    : o.compress
      ? Buffer.from(new SharedArrayBuffer(chunk * o.parallel))
      : pageAlignedBuffer(chunk * o.parallel);
  const worker = async (index: number): Promise<void> => {
    const buf = arena.subarray(index * chunk, (index + 1) * chunk);
    for (let item = await take(); item; item = await take()) {
      try {
        await copyItem(item, buf);
        done += item.length;
        o.onProgress?.(done, size);
      } catch (e) {
        failed ??= e;
      } finally {
        item.release?.();
      }
    }
  };

  try {
    await Promise.all(Array.from({ length: o.parallel }, (_, i) => worker(i)));
  } finally {
    if (o.direct) src.releaseBuffer(arena);
  }
  if (failed !== undefined) throw failed;
  await dst.flush();
}

/**
 * The logger of convert's debug events, loaded only when they are wanted: a short convert
 * pays every module it loads at start-up in full.
 */
async function debugLogger(): Promise<Logger | undefined> {
  const level = process.env.VMDISK_LOG_LEVEL;
  if (level !== 'debug' && level !== 'trace') return undefined;
  return (await import('../log.ts')).createLogger();
}

export async function convert(
  argv: readonly string[],
  out: NodeJS.WritableStream,
): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    'target-format': { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true, default: [] },
    backing: { type: 'string', short: 'B' },
    'backing-format': { type: 'string', short: 'F' },
    compress: { type: 'boolean', short: 'c', default: false },
    'no-create': { type: 'boolean', short: 'n', default: false },
    'out-of-order': { type: 'boolean', short: 'W', default: false },
    parallel: { type: 'string', short: 'm' },
    sparse: { type: 'string', short: 'S' },
    cache: { type: 'string', short: 't' },
    'source-cache': { type: 'string', short: 'T' },
    progress: { type: 'boolean', short: 'p', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
    'target-is-zero': { type: 'boolean', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    'target-image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length < 2) throw new UsageError('Must specify image file name');
  if (positionals.length > 2)
    throw new UsageError('vm-disk convert takes one source image and one target');
  const [source, target] = positionals as [string, string];
  const format = values['target-format'] ?? 'raw';
  const parallel = intArg(values.parallel, 'number of coroutines', 1, 16) ?? 8;
  let minSparse = 4096;
  if (values.sparse !== undefined) {
    const s = /^\d+$/.test(values.sparse) ? Number(values.sparse) : sizeArg('-S', values.sparse);
    if (s % 512 !== 0 || s > MAX_SPARSE) {
      throw new UsageError(
        'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).',
      );
    }
    minSparse = s;
  }
  checkCacheMode(values.cache);
  checkCacheMode(values['source-cache']);
  if (values['target-is-zero'] && !values['no-create'])
    throw new UsageError('--target-is-zero requires use of -n flag');
  if (format !== 'raw' && format !== 'qcow2')
    throw new ImageCommandError(`Unknown file format '${format}'`);
  if (values.compress && format !== 'qcow2')
    throw new ImageCommandError('Compression not supported for this file format');
  if (values.backing !== undefined && format !== 'qcow2')
    throw new ImageCommandError(`Backing file not supported for file format '${format}'`);
  if (values.backing !== undefined && values['no-create'])
    throw new UsageError('-B makes no sense when not creating the target image');

  const log = await debugLogger();
  const graph = await imageGraph(values.object);
  try {
    const src = await openImage(
      graph,
      {
        name: source,
        format: values.format,
        imageOpts: values['image-opts'],
        readOnly: true,
        forceShare: values['force-share'],
        cache: values['source-cache'],
      },
      'source',
    );
    const size = src.size();
    const nbdTarget = !values['target-image-opts'] && nbdUri(target) !== undefined;
    if (!values['no-create'] && !nbdTarget && !values['target-image-opts']) {
      await createImage({
        path: target,
        format,
        options: values.options,
        size,
        backingFile: values.backing,
        backingFormat: values['backing-format'],
      }).catch((e: unknown) => {
        // As qemu-img: a refused -o is the command's failure (status 1).
        if (e instanceof BadOptionError) throw new ImageCommandError(e.message, { cause: e });
        throw e;
      });
    }
    const dst = await openImage(
      graph,
      {
        name: target,
        format: values['target-image-opts'] ? undefined : format,
        imageOpts: values['target-image-opts'],
        readOnly: false,
        // qemu-img convert's default for the target: no flushes (the copy is redone if it
        // is lost; -t writeback or stricter to have it flushed).
        cache: values.cache ?? 'unsafe',
      },
      'target',
    );
    if (dst.size() < size) {
      throw new ImageCommandError(
        `Error: target image (${dst.size()} bytes) is smaller than the source (${size} bytes)`,
      );
    }
    const progress = new ImgProgress(out, values.progress && !values.quiet, log, 'convert');
    progress.start();
    log?.debug({ event: 'convert-start', source, target, size }, 'convert started');
    await copyImage(src, dst, {
      minSparse,
      compress: values.compress,
      targetHasBacking: values.backing !== undefined,
      // A new image reads as zeros, unless it has a backing file.
      zeroInit:
        values['target-is-zero'] ||
        (!values['no-create'] && !nbdTarget && values.backing === undefined),
      parallel,
      outOfOrder: values['out-of-order'],
      direct: [values.cache, values['source-cache']].some(
        (c) => c === 'none' || c === 'directsync',
      ),
      onProgress: (done, total) => progress.update(done, total),
    });
    progress.end();
    log?.debug({ event: 'convert-done', source, target, size }, 'convert done');
  } finally {
    await graph.close();
  }
  return 0;
}
