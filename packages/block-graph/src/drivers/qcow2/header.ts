// The qcow2 header (docs/interop/qcow2.txt, "Header" and "Header extensions"): parse,
// validate and serialize. Unknown header extensions and unknown additional header fields are
// kept and written back unchanged.

import { badHeader, Qcow2Error, Qcow2ErrorCode, Qcow2UnsupportedError } from '../../errors.ts';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const HEADER_V2_LENGTH = 72;
export const HEADER_V3_MIN_LENGTH = 104;
/** The v3 header length we write: up to compression_type (byte 104) padded to 8. */
export const HEADER_V3_LENGTH = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits: the L1 table at most 32 MiB, the refcount table at most 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;

/** Incompatible feature bits. */
export const Incompat = {
  DIRTY: 1n,
  CORRUPT: 2n,
  DATA_FILE: 4n,
  COMPRESSION_TYPE: 8n,
  EXTENDED_L2: 16n,
} as const;
export const KNOWN_INCOMPAT = 0x1fn;
/** Compatible feature bits. */
export const Compat = { LAZY_REFCOUNTS: 1n } as const;
/** Autoclear feature bits. */
export const Autoclear = { BITMAPS: 1n, DATA_FILE_RAW: 2n } as const;

/** Header extension types. */
export const ExtType = {
  END: 0,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

export const CompressionType = { ZLIB: 0, ZSTD: 1 } as const;

export interface Qcow2Extension {
  type: number;
  data: Uint8Array;
}

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes of additional header fields past compression_type that we do not know (kept). */
  extraFields: Uint8Array;
  /** Every header extension but the backing format and feature name table, in file order. */
  otherExtensions: Qcow2Extension[];
  backingFile: string | null;
  backingFormat: string | null;
  featureNames: FeatureName[];
}

const textDecoder = new TextDecoder('utf-8', { fatal: false });
const textEncoder = new TextEncoder();

function u64(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw badHeader(`${what} ${v} is too large`);
  return Number(v);
}

/** Reads the cluster size from the first bytes of an image (at least 24 of them). */
export function peekClusterBits(buf: Uint8Array): number {
  if (buf.length < 24) throw badHeader('file too short for a qcow2 header');
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(0) !== QCOW2_MAGIC) throw badHeader('bad magic (not a qcow2 image)');
  const bits = dv.getUint32(20);
  if (bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw badHeader(`cluster_bits ${bits} outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  return bits;
}

/**
 * The compression type as QEMU checks it on open, in its order and words: an unknown type
 * is refused (what it would decompress with is not known: reads and writes would go wrong),
 * then the incompatible bit must be set exactly when the type is not zlib.
 */
function checkCompressionType(h: Qcow2Header): void {
  const type = h.compressionType;
  if (type !== CompressionType.ZLIB && type !== CompressionType.ZSTD) {
    throw new Qcow2UnsupportedError('compression type', `qcow2: unknown compression type: ${type}`);
  }
  const bit = (h.incompatibleFeatures & Incompat.COMPRESSION_TYPE) !== 0n;
  if (type === CompressionType.ZLIB && bit) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_HEADER,
      'qcow2: Compression type incompatible feature bit must not be set',
    );
  }
  if (type !== CompressionType.ZLIB && !bit) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_HEADER,
      'qcow2: Compression type incompatible feature bit must be set',
    );
  }
}

/**
 * Parses and validates the header from `buf`, the first cluster of the image (or the whole
 * file when it is shorter than a cluster). Structural errors throw BAD_HEADER; feature policy
 * (what may be opened) is left to the caller, but for an unknown compression type
 * (UNSUPPORTED_FEATURE): nothing can describe such an image.
 */
export function parseHeader(buf: Uint8Array): Qcow2Header {
  const clusterBits = peekClusterBits(buf);
  const clusterSize = 2 ** clusterBits;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) throw badHeader(`unsupported version ${version}`);
  if (buf.length < HEADER_V2_LENGTH) throw badHeader('file too short for a qcow2 header');
  const backingFileOffset = u64(dv, 8, 'backing_file_offset');
  const backingFileSize = dv.getUint32(16);
  const size = u64(dv, 24, 'size');
  const h: Qcow2Header = {
    version,
    clusterBits,
    size,
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1TableOffset: u64(dv, 40, 'l1_table_offset'),
    refcountTableOffset: u64(dv, 48, 'refcount_table_offset'),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    snapshotsOffset: u64(dv, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: HEADER_V2_LENGTH,
    compressionType: 0,
    extraFields: new Uint8Array(0),
    otherExtensions: [],
    backingFile: null,
    backingFormat: null,
    featureNames: [],
  };
  if (version === 3) {
    if (buf.length < HEADER_V3_MIN_LENGTH) throw badHeader('file too short for a v3 header');
    h.incompatibleFeatures = dv.getBigUint64(72);
    h.compatibleFeatures = dv.getBigUint64(80);
    h.autoclearFeatures = dv.getBigUint64(88);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < HEADER_V3_MIN_LENGTH || h.headerLength % 8 !== 0) {
      throw badHeader(`header_length ${h.headerLength} (must be >= 104 and a multiple of 8)`);
    }
    if (h.headerLength > Math.min(clusterSize, buf.length)) {
      throw badHeader(`header_length ${h.headerLength} exceeds the first cluster`);
    }
    if (h.headerLength > 104) {
      h.compressionType = buf[104]!;
      h.extraFields = buf.slice(105, h.headerLength);
    }
  }
  if (h.refcountOrder > 6) throw badHeader(`refcount_order ${h.refcountOrder} > 6`);
  checkCompressionType(h);
  if ((h.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n && clusterBits < 14) {
    throw badHeader('extended L2 entries need clusters of at least 16 KiB');
  }
  if (h.l1TableOffset % clusterSize !== 0) throw badHeader('L1 table offset not cluster aligned');
  if (h.refcountTableOffset % clusterSize !== 0 || h.refcountTableOffset === 0) {
    throw badHeader('refcount table offset zero or not cluster aligned');
  }
  if (h.refcountTableClusters === 0) throw badHeader('refcount table has no clusters');
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw badHeader(`refcount table of ${h.refcountTableClusters} clusters is too large`);
  }
  if (h.l1Size * 8 > MAX_L1_BYTES) throw badHeader(`L1 table of ${h.l1Size} entries is too large`);
  const extendedL2 = (h.incompatibleFeatures & Incompat.EXTENDED_L2) !== 0n;
  const need = l1EntriesFor(size, clusterBits, extendedL2);
  if (h.l1Size < need) {
    throw badHeader(`L1 table of ${h.l1Size} entries too small for ${size} bytes (${need})`);
  }
  if (h.nbSnapshots > 0 && h.snapshotsOffset % clusterSize !== 0) {
    throw badHeader('snapshot table offset not cluster aligned');
  }

  // Header extensions: from the end of the header to the end of the first cluster.
  const limit = Math.min(clusterSize, buf.length);
  let off = h.headerLength;
  for (;;) {
    if (off + 8 > limit) {
      // v2 images without extensions may end right after the header.
      break;
    }
    const type = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    if (type === ExtType.END) break;
    const padded = Math.ceil(len / 8) * 8;
    if (off + 8 + len > limit) throw badHeader(`header extension 0x${type.toString(16)} too long`);
    // A copy: `buf` may be a Buffer (slice is a view) whose memory is reused after parsing.
    const data = new Uint8Array(buf.subarray(off + 8, off + 8 + len));
    if (type === ExtType.BACKING_FORMAT) h.backingFormat = textDecoder.decode(data);
    else if (type === ExtType.FEATURE_TABLE) {
      for (let i = 0; i + 48 <= data.length; i += 48) {
        const raw = data.subarray(i + 2, i + 48);
        const end = raw.indexOf(0);
        h.featureNames.push({
          type: data[i]!,
          bit: data[i + 1]!,
          name: textDecoder.decode(end < 0 ? raw : raw.subarray(0, end)),
        });
      }
    } else h.otherExtensions.push({ type, data });
    off += 8 + padded;
  }

  if (backingFileOffset !== 0) {
    if (backingFileSize > 1023) throw badHeader(`backing file name of ${backingFileSize} bytes`);
    if (backingFileOffset + backingFileSize > limit) {
      throw badHeader('backing file name outside the first cluster');
    }
    h.backingFile = textDecoder.decode(
      buf.subarray(backingFileOffset, backingFileOffset + backingFileSize),
    );
  }
  return h;
}

/** L1 entries needed to map `size` bytes. */
export function l1EntriesFor(size: number, clusterBits: number, extendedL2: boolean): number {
  const l2Entries = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  const perL2 = l2Entries * 2 ** clusterBits;
  return Math.ceil(size / perL2);
}

/** QEMU's feature name table, written by create and header rewrites of v3 images. */
export const STANDARD_FEATURE_NAMES: FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

/**
 * Serializes the header, its extensions and the backing file name into one buffer of exactly
 * `clusterSize` bytes (the first cluster). Throws BAD_HEADER when they do not fit.
 */
export function serializeHeader(h: Qcow2Header): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const buf = new Uint8Array(clusterSize);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, QCOW2_MAGIC);
  dv.setUint32(4, h.version);
  dv.setUint32(20, h.clusterBits);
  dv.setBigUint64(24, BigInt(h.size));
  dv.setUint32(32, h.cryptMethod);
  dv.setUint32(36, h.l1Size);
  dv.setBigUint64(40, BigInt(h.l1TableOffset));
  dv.setBigUint64(48, BigInt(h.refcountTableOffset));
  dv.setUint32(56, h.refcountTableClusters);
  dv.setUint32(60, h.nbSnapshots);
  dv.setBigUint64(64, BigInt(h.snapshotsOffset));
  let off = HEADER_V2_LENGTH;
  if (h.version === 3) {
    dv.setBigUint64(72, h.incompatibleFeatures);
    dv.setBigUint64(80, h.compatibleFeatures);
    dv.setBigUint64(88, h.autoclearFeatures);
    dv.setUint32(96, h.refcountOrder);
    const len = Math.max(h.headerLength, HEADER_V3_LENGTH);
    dv.setUint32(100, len);
    buf[104] = h.compressionType;
    buf.set(h.extraFields.subarray(0, len - 105), 105);
    off = len;
  }
  const exts: Qcow2Extension[] = [];
  if (h.backingFormat !== null) {
    exts.push({ type: ExtType.BACKING_FORMAT, data: textEncoder.encode(h.backingFormat) });
  }
  if (h.version === 3 && h.featureNames.length > 0) {
    const data = new Uint8Array(48 * h.featureNames.length);
    h.featureNames.forEach((f, i) => {
      data[i * 48] = f.type;
      data[i * 48 + 1] = f.bit;
      data.set(textEncoder.encode(f.name).subarray(0, 46), i * 48 + 2);
    });
    exts.push({ type: ExtType.FEATURE_TABLE, data });
  }
  exts.push(...h.otherExtensions);
  const overflow = () => badHeader('header, extensions and backing file name exceed a cluster');
  for (const e of exts) {
    const padded = Math.ceil(e.data.length / 8) * 8;
    if (off + 8 + padded > clusterSize) throw overflow();
    dv.setUint32(off, e.type);
    dv.setUint32(off + 4, e.data.length);
    buf.set(e.data, off + 8);
    off += 8 + padded;
  }
  if (off + 8 > clusterSize) throw overflow();
  off += 8; // end marker (zeros)
  if (h.backingFile !== null) {
    const name = textEncoder.encode(h.backingFile);
    if (name.length > 1023) throw badHeader('backing file name longer than 1023 bytes');
    if (off + name.length > clusterSize) throw overflow();
    buf.set(name, off);
    dv.setBigUint64(8, BigInt(off));
    dv.setUint32(16, name.length);
  }
  return buf;
}
