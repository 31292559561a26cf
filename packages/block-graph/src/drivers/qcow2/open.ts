// Opening an image (QEMU's qcow2_do_open): refuse what is not supported, load the L1 table
// and set up the L2 and refcount caches, repair a dirty image's refcounts before writing.

import { badOption, Qcow2CorruptError, Qcow2UnsupportedError } from '../../errors.ts';
import { computeReferences, rebuildRefcounts } from './check.ts';
import { parseL1 } from './cluster-map.ts';
import { flushMetadata } from './flush.ts';
import { Autoclear, Incompat, KNOWN_INCOMPAT } from './header.ts';
import { MetadataCache } from './l2-cache.ts';
import { RefcountManager } from './refcount.ts';
import { MiB, type Qcow2State, writeHeader } from './state.ts';
import { ioBuffer, releaseIoBuffer } from './types.ts';

/** Checks what the header asks for, loads L1 and the caches, repairs a dirty image (QEMU's qcow2_do_open). */
export async function openImage(s: Qcow2State): Promise<void> {
  const h = s.header;
  const unknown = h.incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const f = h.featureNames.find((x) => x.type === 0 && x.bit === bit);
        names.push(f ? `${f.name} (bit ${bit})` : `unknown incompatible feature bit ${bit}`);
      }
    }
    throw new Qcow2UnsupportedError(
      names.join(', '),
      `qcow2 image uses unsupported incompatible features: ${names.join(', ')}`,
    );
  }
  if (h.cryptMethod !== 0) {
    const what =
      h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    throw new Qcow2UnsupportedError('encryption', `qcow2 encryption (${what}) is not supported`);
  }
  if (h.incompatibleFeatures & Incompat.DATA_FILE) {
    throw new Qcow2UnsupportedError(
      'external data file',
      'qcow2 images with an external data file are not supported',
    );
  }
  if (!s.readOnly && h.incompatibleFeatures & Incompat.CORRUPT) {
    throw new Qcow2CorruptError(
      'the image is marked corrupt (corrupt bit); open it read-only or repair it with qemu-img check -r all',
    );
  }
  if (h.backingFile !== null && s.options.backing === undefined) {
    throw badOption(
      `the image has backing file '${h.backingFile}': pass 'backing' (a reader, or null for none)`,
    );
  }
  s.backing = s.options.backing ?? null;
  if (s.backing) s.backingSize = await s.backing.size();

  const l1Bytes = ioBuffer(s.file, h.l1Size * 8);
  let l1: ReturnType<typeof parseL1>;
  try {
    if (l1Bytes.length > 0) {
      const got = await s.file.read(l1Bytes, h.l1TableOffset);
      if (got < l1Bytes.length)
        throw new Qcow2CorruptError(`L1 table at ${h.l1TableOffset} is truncated`);
    }
    l1 = parseL1(l1Bytes);
  } finally {
    releaseIoBuffer(s.file, l1Bytes);
  }
  s.l1 = l1.offsets;
  s.l1Copied = l1.copied;
  // Indexed, as the refcount table's scan (cold code: entries() is slow there).
  for (let i = 0; i < s.l1.length; i++) {
    const o = s.l1[i]!;
    if (o === 0) continue;
    if (o % s.clusterSize !== 0)
      throw new Qcow2CorruptError(`L1 entry ${i} (${o}) is not cluster aligned`);
    s.l2Offsets.add(o);
  }
  const cs = s.clusterSize;
  const wholeDisk = Math.ceil(h.size / s.geom.l2Span) * cs;
  const l2Bytes = s.options.l2CacheSize ?? Math.min(32 * MiB, Math.max(wholeDisk, 2 * cs));
  s.l2Cache = new MetadataCache({
    capacity: Math.floor(l2Bytes / cs),
    entrySize: cs,
    load: async (offset, buf) => {
      const got = await s.file.read(buf, offset);
      if (got < buf.length)
        throw new Qcow2CorruptError(`L2 table at ${offset} is past the end of the file`);
    },
    evictDirty: () => flushMetadata(s),
    alloc: (n) => ioBuffer(s.file, n),
    release: (b) => releaseIoBuffer(s.file, b),
  });
  await loadRefcounts(s);

  if (!s.readOnly) {
    if (h.incompatibleFeatures & Incompat.DIRTY) {
      // Refcounts may be stale: rebuild them from L1/L2 before writing anything.
      await rebuildDirtyRefcounts(s);
      h.incompatibleFeatures &= ~Incompat.DIRTY;
      await writeHeader(s);
    }
    // Clear every autoclear bit we do not keep up to date before writing: the bitmaps bit
    // stays only when the caller loads and stores the bitmaps (the graph's qcow2 driver).
    const keep = s.options.keepBitmaps ? Autoclear.BITMAPS : 0n;
    if ((h.autoclearFeatures & ~keep) !== 0n) {
      h.autoclearFeatures &= keep;
      await writeHeader(s);
    }
  }
}

async function loadRefcounts(s: Qcow2State): Promise<void> {
  const h = s.header;
  const rcBytes = s.options.refcountCacheSize ?? Math.max(4 * s.clusterSize, 256 * 1024);
  s.refcounts = await RefcountManager.load(
    s.file,
    { clusterBits: h.clusterBits, refcountOrder: h.refcountOrder },
    h.refcountTableOffset,
    h.refcountTableClusters,
    {
      cacheCapacity: Math.floor(rcBytes / s.clusterSize),
      writeHeaderReftable: async (offset, clusters) => {
        h.refcountTableOffset = offset;
        h.refcountTableClusters = clusters;
        await writeHeader(s);
      },
    },
  );
}

async function rebuildDirtyRefcounts(s: Qcow2State): Promise<void> {
  s.refcounts.close();
  const refs = await computeReferences(s.file, s.header, false);
  if (refs.errors.length > 0) {
    throw new Qcow2CorruptError(`cannot rebuild refcounts of a dirty image: ${refs.errors[0]}`);
  }
  await rebuildRefcounts(s.file, s.header, refs, () => writeHeader(s));
  await loadRefcounts(s);
}
