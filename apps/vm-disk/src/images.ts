// `vm-disk create | info | map`, in the spirit of qemu-img: make raw and qcow2 images,
// describe them, and map their allocation. Files are opened through @vmdisk/engine, and
// images are read through a @vmdisk/block-graph graph, as the daemon reads them.
import { open, stat, unlink } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  BlockGraph,
  checkQcow2CreateOptions,
  createQcow2,
  type Extent,
  ImageLockError,
  lockForCreate,
  parseQcow2Header,
  type Qcow2CreateOptions,
  schema,
} from '@vmdisk/block-graph';
import { type EngineFile, sharedEngine } from '@vmdisk/engine';
import { BadOptionError, VmDiskError } from './errors.ts';
import { parseKeyval } from './options/keyval.ts';
import { ProgressBar } from './progress.ts';

const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');
const BOCHS_MAGIC = Buffer.from('Bochs Virtual HD Image');

type Format = 'qcow2' | 'raw' | 'bochs';

function sizeArg(option: string, text: string): number {
  const size = schema.parseSize(text);
  if (size === undefined)
    throw new BadOptionError(option, `'${text}' is not a size (e.g. 64M, 10G)`);
  return size;
}

async function openFile(
  path: string,
  options: { readOnly?: boolean; create?: boolean },
): Promise<EngineFile> {
  const engine = await sharedEngine();
  return engine.openFile(path, options);
}

/** The image format of `path`, probed from its first bytes as qemu-img does. */
export async function probeFormat(path: string): Promise<Format> {
  const file = await openFile(path, { readOnly: true });
  try {
    const head = Buffer.alloc(512);
    const n = await file.read(head, 0);
    if (n >= 4 && head.subarray(0, 4).equals(QCOW2_MAGIC)) return 'qcow2';
    if (n >= BOCHS_MAGIC.length && head.subarray(0, BOCHS_MAGIC.length).equals(BOCHS_MAGIC))
      return 'bochs';
    return 'raw';
  } finally {
    await file.close();
  }
}

// ---- create ----

const QCOW2_OPTIONS = new Set([
  'size',
  'cluster_size',
  'compat',
  'lazy_refcounts',
  'extended_l2',
  'preallocation',
  'refcount_bits',
  'compression_type',
  'backing_file',
  'backing_fmt',
]);

// Option values as qemu-img parses them, with its messages (the option schema's keyval
// conversion: the same spellings and words as every other option).
function onOff(key: string, value: string): boolean {
  return dashO(() => schema.bool.parse(value, key, 'keyval'));
}

function sizeOption(key: string, value: string): number {
  const size = schema.parseSize(value);
  if (size === undefined) {
    throw new BadOptionError(
      '-o',
      `Parameter '${key}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)`,
    );
  }
  return size;
}

function oneOf<const T extends readonly string[]>(
  key: string,
  value: string,
  values: T,
): T[number] {
  return dashO(() => schema.enumOf(values).parse(value, key, 'keyval'));
}

/** Runs a check of an -o value; its error is the option's. */
function dashO<T>(check: () => T): T {
  try {
    return check();
  } catch (e) {
    throw new BadOptionError('-o', e instanceof Error ? e.message : String(e), { cause: e });
  }
}

/** The qcow2 options of `-o` (parsed as qemu-img parses them), not yet checked together. */
function qcow2CreateOptions(o: Record<string, string>, size: number): Qcow2CreateOptions {
  const options: Qcow2CreateOptions = { size };
  if (o.cluster_size !== undefined)
    options.clusterSize = sizeOption('cluster_size', o.cluster_size);
  if (o.compat !== undefined) {
    const compat = oneOf('version', o.compat, ['0.10', '1.1', 'v2', 'v3']);
    options.compat = compat === '0.10' || compat === 'v2' ? '0.10' : '1.1';
  }
  if (o.lazy_refcounts !== undefined)
    options.lazyRefcounts = onOff('lazy_refcounts', o.lazy_refcounts);
  if (o.extended_l2 !== undefined) options.extendedL2 = onOff('extended_l2', o.extended_l2);
  if (o.refcount_bits !== undefined) {
    if (!/^\d+$/.test(o.refcount_bits))
      throw new BadOptionError('-o', "Parameter 'refcount_bits' expects a number");
    options.refcountBits = Number(o.refcount_bits);
  }
  if (o.compression_type !== undefined)
    options.compressionType = oneOf('compression-type', o.compression_type, ['zlib', 'zstd']);
  if (o.preallocation !== undefined)
    options.preallocation = oneOf('preallocation', o.preallocation, ['off', 'metadata', 'full']);
  return options;
}

/** Whether two names are one file: the same path, or the same device and inode. */
async function sameFile(a: string, b: string): Promise<boolean> {
  if (resolve(a) === resolve(b)) return true;
  try {
    const [x, y] = await Promise.all([stat(a, { bigint: true }), stat(b, { bigint: true })]);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

/**
 * Creates `path` if it does not exist; true when this call created it (so that a failed
 * create may remove it: a file that was there before is never removed).
 */
async function createExclusive(path: string): Promise<boolean> {
  try {
    await (await open(path, 'wx')).close();
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

/**
 * `vm-disk create`: every option is checked before anything is created, so that a refused
 * create leaves nothing behind; a create that fails later removes the file it made (never
 * one that was there before).
 */
export async function create(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...argv],
    options: {
      format: { type: 'string', short: 'f', default: 'raw' },
      options: { type: 'string', short: 'o', multiple: true, default: [] },
      backing: { type: 'string', short: 'b' },
      'backing-format': { type: 'string', short: 'F' },
      quiet: { type: 'boolean', short: 'q' },
    },
    allowPositionals: true,
  });
  const [path, sizeText, ...extra] = positionals;
  if (!path) throw new BadOptionError('create', 'expected FILE [SIZE]');
  if (extra.length > 0) throw new BadOptionError('create', `unexpected argument '${extra[0]}'`);
  const format = values.format;
  if (format !== 'raw' && format !== 'qcow2')
    throw new BadOptionError('-f', `cannot create '${format}' images (raw, qcow2)`);

  const o: Record<string, string> = {};
  for (const text of values.options) {
    try {
      for (const [k, v] of Object.entries(parseKeyval(text))) {
        if (typeof v !== 'string') throw new BadOptionError('-o', `'${k}' takes a value`);
        o[k] = v;
      }
    } catch (e) {
      if (e instanceof BadOptionError) throw e;
      throw new BadOptionError('-o', (e as Error).message);
    }
  }
  const allowed = format === 'qcow2' ? QCOW2_OPTIONS : new Set(['size', 'preallocation']);
  for (const key of Object.keys(o)) {
    if (!allowed.has(key))
      throw new BadOptionError('-o', `Invalid parameter '${key}' for ${format}`);
  }
  const backingFile = values.backing ?? o.backing_file;
  const backingFormat = values['backing-format'] ?? o.backing_fmt;
  if (backingFile !== undefined && format !== 'qcow2')
    throw new BadOptionError('-b', 'only qcow2 images have a backing file');
  // A relative backing file name is relative to the image, as it is when the image opens.
  const backingPath =
    backingFile === undefined
      ? undefined
      : isAbsolute(backingFile)
        ? backingFile
        : join(dirname(path), backingFile);
  if (backingPath !== undefined && (await sameFile(path, backingPath))) {
    throw new VmDiskError(
      'ERR_VMDISK_APP_CREATE',
      `${path}: Error: Trying to create an image with the same filename as the backing file`,
    );
  }

  const optionSize = o.size !== undefined ? sizeOption('size', o.size) : undefined;
  let size = sizeText !== undefined ? sizeArg('SIZE', sizeText) : optionSize;
  if (size === undefined && backingPath !== undefined)
    size = (await describe(backingPath, true)).virtualSize; // as qemu-img: force-share
  if (size === undefined) throw new BadOptionError('create', 'expected an image size');
  size = Math.ceil(size / 512) * 512; // as qemu-img rounds it

  const preallocation = o.preallocation ?? 'off';
  let qcow2: Qcow2CreateOptions | undefined;
  if (format === 'qcow2') {
    qcow2 = qcow2CreateOptions(o, size);
    if (backingFile !== undefined) qcow2.backingFile = backingFile;
    if (backingFormat !== undefined) qcow2.backingFormat = backingFormat;
    checkQcow2CreateOptions(qcow2);
  } else {
    oneOf('preallocation', preallocation, ['off', 'falloc', 'full']);
  }

  const shown = Object.entries({
    ...o,
    ...(backingFile && { backing_file: backingFile }),
    ...(backingFormat && { backing_fmt: backingFormat }),
  })
    .filter(([k]) => k !== 'size')
    .map(([k, v]) => ` ${k}=${v}`)
    .join('');
  if (!values.quiet) out.write(`Formatting '${path}', fmt=${format}${shown} size=${size}\n`);

  const bar =
    !values.quiet && preallocation !== 'off' ? new ProgressBar(`preallocating ${path}`) : undefined;
  const created = await createExclusive(path);
  try {
    const file = await openFile(path, { create: true });
    try {
      // As qemu-img: never truncate an image another process uses.
      lockForCreate(file);
      if (qcow2) {
        const image = {
          read: (buf: Uint8Array, offset: number) => file.read(buf, offset),
          write: (buf: Uint8Array, offset: number) => file.write(buf, offset),
          size: () => file.size(),
          truncate: (length: number) => file.truncate(length),
          flush: () => file.fdatasync(),
        };
        await createQcow2(image, qcow2, (done, total) => bar?.update(done, total));
      } else {
        await createRaw(file, size, preallocation, bar);
      }
    } finally {
      bar?.done();
      await file.close();
    }
  } catch (e) {
    if (created) await unlink(path).catch(() => {});
    throw e;
  }
  return 0;
}

async function createRaw(
  file: EngineFile,
  size: number,
  preallocation: string,
  bar: ProgressBar | undefined,
): Promise<void> {
  await file.truncate(0);
  await file.truncate(size);
  if (preallocation === 'falloc' && size > 0) await file.fallocate('allocate', 0, size);
  if (preallocation === 'full') {
    const engine = await sharedEngine();
    const chunk = engine.allocBuffer(1 << 20).fill(0);
    try {
      for (let at = 0; at < size; at += chunk.length) {
        await file.write(chunk.subarray(0, Math.min(chunk.length, size - at)), at);
        bar?.update(Math.min(size, at + chunk.length), size);
      }
    } finally {
      engine.releaseBuffer(chunk);
    }
  }
  await file.fdatasync();
}

// ---- info ----

export interface ImageDescription {
  filename: string;
  format: Format;
  virtualSize: number;
  actualSize: number;
  clusterSize?: number;
  dirty?: boolean;
  backingFile?: string;
  backingFormat?: string;
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

/**
 * Opens the image at `path` read-only in a graph of its own, as qemu-img opens what it reads:
 * its image locks taken, so that a format image another process writes is refused (its
 * format node shares no write of the file it owns) unless `forceShare` (qemu-img's -U). A
 * raw image is never refused: nobody owns its metadata. Without `backing`, a qcow2 image's
 * backing file is not opened.
 */
async function openForReading(
  path: string,
  format: Format,
  forceShare: boolean,
  backing: boolean,
): Promise<BlockGraph> {
  const graph = new BlockGraph();
  try {
    await graph.add({
      driver: format,
      'node-name': 'image',
      'read-only': true,
      'force-share': forceShare,
      file: { driver: 'file', filename: path },
      ...(format === 'qcow2' && !backing && { backing: null }),
    });
    return graph;
  } catch (e) {
    await graph.close();
    throw couldNotOpen(path, e);
  }
}

/** A lock refusal as qemu-img words it: "Could not open 'PATH': Failed to get ... lock". */
function couldNotOpen(path: string, e: unknown): unknown {
  if (!(e instanceof ImageLockError)) return e;
  return new ImageLockError(`Could not open '${path}': ${e.message}`, path, { cause: e });
}

export async function describe(path: string, forceShare = false): Promise<ImageDescription> {
  const format = await probeFormat(path);
  const graph = await openForReading(path, format, forceShare, false);
  try {
    return await describeOpen(path, format, graph);
  } finally {
    await graph.close();
  }
}

async function describeOpen(
  path: string,
  format: Format,
  graph: BlockGraph,
): Promise<ImageDescription> {
  const st = await stat(path);
  const base = { filename: path, format, actualSize: st.blocks * 512, dirty: false };
  if (format === 'qcow2') {
    const file = await openFile(path, { readOnly: true });
    let header: ReturnType<typeof parseQcow2Header>;
    try {
      const buf = Buffer.alloc(Math.min(st.size, 1 << 20));
      await file.read(buf, 0);
      header = parseQcow2Header(buf);
    } finally {
      await file.close();
    }
    const v3 = header.version === 3;
    const data: Record<string, unknown> = { compat: v3 ? '1.1' : '0.10' };
    if (v3) {
      data['compression-type'] = header.compressionType === 1 ? 'zstd' : 'zlib';
      data['lazy-refcounts'] = (header.compatibleFeatures & 1n) !== 0n;
      data['refcount-bits'] = 1 << header.refcountOrder;
      data.corrupt = (header.incompatibleFeatures & 2n) !== 0n;
      data['extended-l2'] = (header.incompatibleFeatures & 16n) !== 0n;
    } else {
      data['compression-type'] = 'zlib';
      data['refcount-bits'] = 16;
    }
    return {
      ...base,
      virtualSize: header.size,
      clusterSize: 1 << header.clusterBits,
      dirty: (header.incompatibleFeatures & 1n) !== 0n,
      ...(header.backingFile !== null && { backingFile: header.backingFile }),
      ...(header.backingFormat !== null && { backingFormat: header.backingFormat }),
      formatSpecific: { type: 'qcow2', data },
    };
  }
  if (format === 'bochs') return { ...base, virtualSize: graph.node('image').size() };
  return { ...base, virtualSize: st.size };
}

function infoJson(d: ImageDescription): Record<string, unknown> {
  return {
    'virtual-size': d.virtualSize,
    filename: d.filename,
    ...(d.clusterSize !== undefined && { 'cluster-size': d.clusterSize }),
    format: d.format,
    'actual-size': d.actualSize,
    ...(d.formatSpecific && { 'format-specific': d.formatSpecific }),
    ...(d.backingFile !== undefined && { 'backing-filename': d.backingFile }),
    ...(d.backingFormat !== undefined && { 'backing-filename-format': d.backingFormat }),
    ...(d.dirty !== undefined && { 'dirty-flag': d.dirty }),
  };
}

const human = (n: number): string => {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${Number(v.toFixed(3))} ${units[u]}`;
};

/** The command line `info` and `map` share: FILE, `--output human|json`, `-U`. */
function imageArgs(
  command: string,
  argv: readonly string[],
): { path: string; json: boolean; forceShare: boolean } {
  const { values, positionals } = parseArgs({
    args: [...argv],
    options: {
      output: { type: 'string', default: 'human' },
      'force-share': { type: 'boolean', short: 'U', default: false },
    },
    allowPositionals: true,
  });
  const path = positionals[0];
  if (!path || positionals.length > 1) throw new BadOptionError(command, 'expected one FILE');
  if (values.output !== 'human' && values.output !== 'json')
    throw new BadOptionError('--output', 'human or json');
  return { path, json: values.output === 'json', forceShare: values['force-share'] };
}

export async function info(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { path, json, forceShare } = imageArgs('info', argv);
  const d = await describe(path, forceShare);
  if (json) {
    out.write(`${JSON.stringify(infoJson(d), null, 4)}\n`);
    return 0;
  }
  const lines = [
    `image: ${d.filename}`,
    `file format: ${d.format}`,
    `virtual size: ${human(d.virtualSize)} (${d.virtualSize} bytes)`,
    `disk size: ${human(d.actualSize)}`,
  ];
  if (d.clusterSize !== undefined) lines.push(`cluster_size: ${d.clusterSize}`);
  if (d.backingFile !== undefined) lines.push(`backing file: ${d.backingFile}`);
  if (d.backingFormat !== undefined) lines.push(`backing file format: ${d.backingFormat}`);
  if (d.formatSpecific) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(d.formatSpecific.data))
      lines.push(`    ${k.replaceAll('-', ' ')}: ${v}`);
  }
  out.write(`${lines.join('\n')}\n`);
  return 0;
}

// ---- map ----

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

/** The allocation of an image through its whole backing chain, merged as qemu-img map merges it. */
export async function mapImage(path: string, forceShare = false): Promise<MapEntry[]> {
  const format = await probeFormat(path);
  const graph = await openForReading(path, format, forceShare, true);
  try {
    const chainLength = graph.query().filter((n) => n.driver !== 'file').length;
    const backend = await graph.createBackend('image', {
      name: 'map',
      maxExtents: 65536,
      perm: ['consistent-read'],
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
    const size = backend.size();
    const entries: MapEntry[] = [];
    for (let offset = 0; offset < size; ) {
      const extents: Extent[] = await backend.blockStatus(offset, size - offset);
      for (const e of extents) {
        const length = Math.min(e.length, size - offset);
        const depth = e.depth ?? 1;
        const entry: MapEntry = {
          start: offset,
          length,
          depth: depth === 0 ? chainLength - 1 : depth - 1,
          present: depth !== 0,
          zero: e.zero,
          data: !e.hole,
        };
        const last = entries.at(-1);
        if (
          last &&
          last.depth === entry.depth &&
          last.present === entry.present &&
          last.zero === entry.zero &&
          last.data === entry.data
        ) {
          last.length += length;
        } else {
          entries.push(entry);
        }
        offset += length;
        if (offset >= size) break;
      }
    }
    await backend.close();
    return entries;
  } finally {
    await graph.close();
  }
}

export async function map(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { path, json, forceShare } = imageArgs('map', argv);
  const entries = await mapImage(path, forceShare);
  if (json) {
    out.write(`[${entries.map((e) => JSON.stringify(e)).join(',\n')}]\n`);
    return 0;
  }
  out.write(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Depth'.padEnd(8)}Allocation\n`);
  for (const e of entries) {
    const what = !e.present ? 'unallocated' : e.zero ? 'zero' : 'data';
    out.write(
      `${`0x${e.start.toString(16)}`.padEnd(20)}${`0x${e.length.toString(16)}`.padEnd(20)}${String(e.depth).padEnd(8)}${what}\n`,
    );
  }
  return 0;
}
