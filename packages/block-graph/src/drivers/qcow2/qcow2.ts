// The `qcow2` format driver for the block graph: blockdev-add options as QEMU's
// (file, backing, lazy-refcounts, l2-cache-size, refcount-cache-size), the image core
// (image.ts) doing the metadata, the generic layer doing the data I/O through map().
//
// - map('read') answers data (in `file` at the host offset), zero or unallocated (the
//   generic layer reads the backing chain). Compressed clusters cannot be described as a
//   place in a child: they are answered as data with a `read` hook (Mapping.read) that
//   reads through the core, which decompresses.
// - map('write') answers data at the host offset; where clusters (extended L2:
//   subclusters) are allocated or completed, with an `allocation` the generic layer fills
//   (copy on write from below, or zeros), writes and commits: the L2 entry is set only
//   after the data is written. In-place writes carry an allocation too (the exact range,
//   nothing to fill) so that the core knows when the data write has finished: a cluster
//   freed by a concurrent discard is not reused while a write to it is in flight.
// - writeZeroes and discard are the core's (zero clusters, deallocation).
// - With no `backing` key, the backing file the header names is opened as the `backing`
//   child (resolved relative to the image file; its format from the header, else probed:
//   qcow2, then raw); `backing: null` opens the image without one, as QEMU does.

import { dirname, isAbsolute, resolve } from 'node:path';
import {
  type BdrvChild,
  type ChildNode,
  defineDriver,
  type FormatInstance,
  type Mapping,
  type OpenContext,
} from '../../driver.ts';
import { BlockError, BlockOptionError, Qcow2ErrorCode } from '../../errors.ts';
import { bool, type InferMembers, int, opt } from '../../schema.ts';
import { Qcow2Bitmaps } from './bitmaps.ts';
import { Incompat } from './header.ts';
import {
  openQcow2,
  type Qcow2Image,
  type Qcow2ReadMapping,
  type Qcow2WriteMapping,
} from './image.ts';
import type { Qcow2BackingReader, Qcow2File } from './types.ts';

/**
 * A node of the graph (the `file` child's node) as the qcow2 core's image file: reads past
 * its end are short, writes past its end grow it (the node must allow that: a parent
 * holding 'resize', as a format on its file child does). Also what a blockdev-create job
 * hands to createQcow2.
 */
export function qcow2FileOf(node: ChildNode): Qcow2File {
  return fileThrough(() => node);
}

/** The same through an edge, following it to whatever node it points at now. */
function fileThrough(nodeOf: () => ChildNode): Qcow2File {
  return {
    async read(buf, offset) {
      const node = nodeOf();
      const n = Math.min(buf.byteLength, node.size() - offset);
      if (n <= 0) return 0;
      await node.read(offset, buf.subarray(0, n));
      return n;
    },
    write: (buf, offset) => nodeOf().write(offset, buf),
    size: async () => nodeOf().size(),
    truncate: (size) => nodeOf().truncate(size),
    flush: () => nodeOf().flush(),
    discard: (offset, length) => nodeOf().discard(offset, length),
    // Metadata and copy-on-write buffers from the graph's aligned allocator: no bounce
    // under cache.direct=on.
    allocBuffer: (length) => nodeOf().allocBuffer(length),
    releaseBuffer: (buf) => nodeOf().releaseBuffer(buf),
  };
}

function childReader(child: BdrvChild): Qcow2BackingReader {
  return {
    read: (buf, offset) => child.node.read(offset, buf),
    size: async () => child.node.size(),
  };
}

class Qcow2Instance implements FormatInstance {
  readonly kind = 'format';
  readonly image: Qcow2Image;
  /** The image's persistent dirty bitmaps (bitmaps.ts). */
  readonly persistentBitmaps: Qcow2Bitmaps;
  readonly #file: BdrvChild;
  /** Reads compressed clusters (guest offsets) through the core, which decompresses. */
  readonly #readCompressed: (offset: number, buf: Uint8Array) => Promise<void>;

  constructor(image: Qcow2Image, file: BdrvChild) {
    this.image = image;
    this.persistentBitmaps = new Qcow2Bitmaps(image);
    this.#file = file;
    this.#readCompressed = (offset, buf) => image.read(buf, offset);
  }

  size(): number {
    return this.image.virtualSize;
  }

  map(offset: number, length: number, intent: 'read' | 'write'): Mapping | Promise<Mapping> {
    // Synchronous answers from the cached L2 tables where possible (no await per request).
    if (intent === 'write') {
      const w = this.image.mapWriteCached(offset, length);
      if (w) return this.#writeMapping(w);
      return this.image.mapWrite(offset, length).then((m) => this.#writeMapping(m));
    }
    const m = this.image.mapReadCached(offset, length);
    if (m) return this.#readMapping(m);
    return this.image.mapRead(offset, length).then((x) => this.#readMapping(x));
  }

  #writeMapping(w: Qcow2WriteMapping): Mapping {
    return {
      length: w.length,
      kind: 'data',
      child: this.#file,
      offset: w.host,
      allocation: w.allocation,
    };
  }

  #readMapping(m: Qcow2ReadMapping): Mapping {
    switch (m.kind) {
      case 'data':
        return { length: m.length, kind: 'data', child: this.#file, offset: m.host! };
      case 'compressed':
        return { length: m.length, kind: 'data', read: this.#readCompressed };
      default:
        return { length: m.length, kind: m.kind, ...(m.host !== undefined && { offset: m.host }) };
    }
  }

  writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    return this.image.writeZeroes(offset, length, { mayUnmap });
  }

  discard(offset: number, length: number): Promise<void> {
    return this.image.discard(offset, length);
  }

  flush(): Promise<void> {
    return this.image.flush();
  }

  truncate(size: number): Promise<void> {
    return this.image.resize(size);
  }

  get compressedUnit(): number {
    return this.image.clusterSize;
  }

  writeCompressed(offset: number, buf: Uint8Array): Promise<void> {
    return this.image.writeCompressed(buf, offset);
  }

  changeBackingFile(filename: string | null, format: string | null): Promise<void> {
    return this.image.changeBackingFile(filename, format);
  }

  makeEmpty(): Promise<void> {
    return this.image.makeEmpty();
  }

  backingChanged(child: BdrvChild | undefined): void {
    this.image.setBacking(child ? childReader(child) : null, child?.node.size() ?? 0);
  }

  close(): Promise<void> {
    return this.image.close();
  }

  info(): Record<string, unknown> {
    const h = this.image.header;
    return {
      format: 'qcow2',
      compat: h.version === 3 ? '1.1' : '0.10',
      'cluster-size': this.image.clusterSize,
      'lazy-refcounts': this.image.lazyRefcounts,
      'refcount-bits': 2 ** h.refcountOrder,
      'extended-l2': (h.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n,
      ...(h.backingFile !== null ? { 'backing-filename': h.backingFile } : {}),
      ...(h.backingFormat !== null ? { 'backing-filename-format': h.backingFormat } : {}),
      corrupt: this.image.corrupt,
      'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
      'dirty-flag': (h.incompatibleFeatures & Incompat.DIRTY) !== 0n,
    };
  }
}

/** Opens the backing file the header names as the `backing` child (probing its format). */
async function openHeaderBacking(
  ctx: OpenContext,
  name: string,
  format: string | null,
): Promise<BdrvChild> {
  const base = ctx.children.file!.node.filename;
  const filename = isAbsolute(name) || base === undefined ? name : resolve(dirname(base), name);
  const file = { driver: 'file', filename };
  if (format !== null) return ctx.openChild('backing', { driver: format, file });
  try {
    return await ctx.openChild('backing', { driver: 'qcow2', file });
  } catch (err) {
    if (!(err instanceof BlockError) || err.code !== Qcow2ErrorCode.BAD_HEADER) throw err;
    return ctx.openChild('backing', { driver: 'raw', file });
  }
}

/**
 * l2-cache-size, refcount-cache-size and cache-size as QEMU reads them: cache-size is the
 * sum of the two; given alone, the L2 cache gets what covers the whole disk (at most all of
 * it) and the refcount cache the rest (at least 4 clusters).
 */
function cacheSizes(
  o: Readonly<InferMembers<typeof qcow2Options>>,
  virtualSize: number,
  clusterSize: number,
  l2Span: number,
): { l2CacheSize?: number; refcountCacheSize?: number } {
  const { 'l2-cache-size': l2, 'refcount-cache-size': rc, 'cache-size': all } = o;
  const out: { l2CacheSize?: number; refcountCacheSize?: number } = {};
  if (all === undefined) {
    if (l2 !== undefined) out.l2CacheSize = l2;
    if (rc !== undefined) out.refcountCacheSize = rc;
    return out;
  }
  if (l2 !== undefined && rc !== undefined) {
    if (l2 + rc > all) {
      throw new BlockOptionError(
        'cache-size',
        `l2-cache-size (${l2}) + refcount-cache-size (${rc}) exceed cache-size (${all})`,
      );
    }
    return { l2CacheSize: l2, refcountCacheSize: rc };
  }
  if (l2 !== undefined) {
    if (l2 > all) throw new BlockOptionError('l2-cache-size', `${l2} exceeds cache-size (${all})`);
    return { l2CacheSize: l2, refcountCacheSize: all - l2 };
  }
  if (rc !== undefined) {
    if (rc > all)
      throw new BlockOptionError('refcount-cache-size', `${rc} exceeds cache-size (${all})`);
    return { l2CacheSize: all - rc, refcountCacheSize: rc };
  }
  const minRc = 4 * clusterSize;
  const wholeDisk = Math.ceil(virtualSize / l2Span) * clusterSize;
  const l2Part = Math.max(0, Math.min(wholeDisk, all - minRc));
  return { l2CacheSize: l2Part, refcountCacheSize: Math.max(minRc, all - l2Part) };
}

const qcow2Options = {
  'lazy-refcounts': opt(bool),
  'cache-size': opt(int({ min: 0 })),
  'l2-cache-size': opt(int({ min: 0 })),
  'refcount-cache-size': opt(int({ min: 0 })),
};

export const qcow2Driver = defineDriver({
  name: 'qcow2',
  options: qcow2Options,
  // Read-only and the cache options are the open image's: a reopen opens it again.
  reopen: { options: Object.keys(qcow2Options), instance: true },
  children: [
    { key: 'file', required: true, roles: () => ['data', 'metadata', 'primary'] },
    { key: 'backing', required: false, nullable: true, roles: () => ['cow'] },
  ],
  async open(ctx) {
    const file = ctx.children.file!;
    const o = ctx.options;
    const f = fileThrough(() => file.node); // the edge, not the node: a graph change may move it
    // The header decides what else is needed: read it without a backing file first.
    const probe = await openQcow2(f, { readOnly: true, backing: null });
    await probe.close();
    const opts: Parameters<typeof openQcow2>[1] = {
      readOnly: ctx.readOnly,
      keepBitmaps: true, // the node layer loads and stores them (bitmaps.ts)
      ...cacheSizes(o, probe.virtualSize, probe.clusterSize, probe.geom.l2Span),
    };
    if (o['lazy-refcounts'] !== undefined) {
      if (o['lazy-refcounts'] === true && probe.header.version < 3) {
        throw new BlockOptionError('lazy-refcounts', 'lazy refcounts need a compat=1.1 image');
      }
      opts.lazyRefcounts = o['lazy-refcounts'];
    }
    let backing = ctx.children.backing;
    const explicitNull = ctx.nullChildren.has('backing');
    if (!backing && !explicitNull && probe.header.backingFile !== null) {
      backing = await openHeaderBacking(ctx, probe.header.backingFile, probe.header.backingFormat);
    }
    opts.backing = backing ? childReader(backing) : null;
    const image = await openQcow2(f, opts);
    return new Qcow2Instance(image, file);
  },
});
