// `vm-disk info`, as `qemu-img info`: format, sizes, backing file (and the path it
// resolves to), qcow2 features; with --backing-chain every layer, as a JSON list.
import { existsSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { BlockGraph, parseQcow2Header, qcow2BitmapInfoList } from '@vmdisk/block-graph';
import { UsageError } from '../errors.ts';
import { imageArgs } from './args.ts';
import { humanField } from './human-value.ts';
import {
  couldNotOpen,
  FORMATS,
  type Format,
  nodeOptions,
  openFile,
  openForReading,
  probeFormat,
} from './open.ts';
import { rbdFilename } from './rbd-name.ts';

/**
 * The name a backing file name stands for next to `image` (QEMU path_combine): as is when
 * absolute or `image` has no directory, else in `image`'s directory.
 */
export function fullBackingName(image: string, backing: string): string {
  if (backing.startsWith('/') || /^[a-z][\w+.-]*:/i.test(backing)) return backing;
  const slash = image.lastIndexOf('/');
  return slash < 0 ? backing : image.slice(0, slash + 1) + backing;
}

export interface ImageDescription {
  filename: string;
  format: Format;
  virtualSize: number;
  /** Absent where the storage cannot tell (rbd: "disk size: unavailable"). */
  actualSize?: number | undefined;
  clusterSize?: number;
  dirty?: boolean;
  backingFile?: string;
  fullBackingFile?: string;
  backingFormat?: string;
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

export async function describe(
  path: string,
  forceShare = false,
  given?: string,
): Promise<ImageDescription> {
  const rbd = rbdFilename(path);
  if (rbd !== undefined) return describeRbd(path, rbd, (given as Format | undefined) ?? 'raw');
  const format = (given as Format | undefined) ?? (await probeFormat(path));
  const graph = await openForReading(path, format, forceShare, false);
  try {
    return await describeOpen(path, format, graph);
  } finally {
    await graph.close();
  }
}

/**
 * An image of a Ceph cluster (`rbd:` name): a raw image is the rbd image itself. Named as
 * qemu-img names it, by its options as json:{...}.
 */
async function describeRbd(
  path: string,
  file: Record<string, unknown>,
  format: Format,
): Promise<ImageDescription> {
  if (format !== 'raw') throw new UsageError(`info: ${format} images on rbd are not supported yet`);
  const graph = new BlockGraph();
  try {
    await graph.add({ driver: 'raw', 'node-name': 'image', 'read-only': true, file });
    const info = graph.query().find((n) => n.driver === 'rbd') as
      | Record<string, unknown>
      | undefined;
    const { driver, namespace, ...rest } = file;
    const name = { ...rest, driver, namespace: namespace ?? '' };
    return {
      filename: `json:${qemuJson({ driver: 'raw', file: name })}`,
      format,
      virtualSize: graph.node('image').size(),
      ...(typeof info?.['cluster-size'] === 'number' && { clusterSize: info['cluster-size'] }),
      dirty: false,
    };
  } catch (e) {
    // qemu-img's words before the driver's; the error (and its code) kept.
    if (e instanceof Error) e.message = `Could not open '${path}': ${e.message}`;
    throw e;
  } finally {
    await graph.close();
  }
}

/** JSON as QEMU's qobject_to_json writes it in a json: name (", " and ": "). */
function qemuJson(value: unknown): string {
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${qemuJson(v)}`);
    return `{${entries.join(', ')}}`;
  }
  return JSON.stringify(value);
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
    let bitmaps: Awaited<ReturnType<typeof qcow2BitmapInfoList>>;
    try {
      const buf = Buffer.alloc(Math.min(st.size, 1 << 20));
      await file.read(buf, 0);
      header = parseQcow2Header(buf);
      bitmaps = await qcow2BitmapInfoList(file, header);
    } finally {
      await file.close();
    }
    const v3 = header.version === 3;
    const data: Record<string, unknown> = { compat: v3 ? '1.1' : '0.10' };
    if (v3) {
      data['compression-type'] = header.compressionType === 1 ? 'zstd' : 'zlib';
      data['lazy-refcounts'] = (header.compatibleFeatures & 1n) !== 0n;
      if (bitmaps) data.bitmaps = bitmaps;
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
      ...(header.backingFile !== null && {
        backingFile: header.backingFile,
        fullBackingFile: fullBackingName(path, header.backingFile),
      }),
      ...(header.backingFormat !== null && { backingFormat: header.backingFormat }),
      formatSpecific: { type: 'qcow2', data },
    };
  }
  if (format === 'bochs') return { ...base, virtualSize: graph.node('image').size() };
  // QEMU's raw size is in whole sectors.
  return { ...base, virtualSize: Math.ceil(st.size / 512) * 512 };
}

/** qemu-img's ImageInfo, its members in the order it prints them. */
function infoJson(d: ImageDescription): Record<string, unknown> {
  return {
    ...(d.backingFormat !== undefined && { 'backing-filename-format': d.backingFormat }),
    'virtual-size': d.virtualSize,
    filename: d.filename,
    ...(d.clusterSize !== undefined && { 'cluster-size': d.clusterSize }),
    format: d.format,
    ...(d.actualSize !== undefined && { 'actual-size': d.actualSize }),
    ...(d.formatSpecific && { 'format-specific': d.formatSpecific }),
    ...(d.fullBackingFile !== undefined && { 'full-backing-filename': d.fullBackingFile }),
    ...(d.backingFile !== undefined && { 'backing-filename': d.backingFile }),
    ...(d.dirty !== undefined && { 'dirty-flag': d.dirty }),
  };
}

/**
 * QEMU's size_to_str: "%0.3g" of the size in the largest unit it is at least 1000/1024 of
 * (so 1000 bytes are 0.977 KiB), ties of the exact value rounded to even as printf does.
 */
export function human(n: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  while (i < units.length - 1 && n / 2 ** (10 * (i + 1)) >= 1000 / 1024) i++;
  const v = n / 2 ** (10 * i);
  if (v === 0) return `0 ${units[i]}B`;
  const scale = 10 ** (2 - Math.floor(Math.log10(v)));
  const s = v * scale;
  const tie = Number.isInteger(s * 2) && !Number.isInteger(s);
  const r = tie ? (Math.floor(s) % 2 === 0 ? Math.floor(s) : Math.ceil(s)) : Math.round(s);
  return `${Number((r / scale).toPrecision(3))} ${units[i]}B`;
}

function humanInfo(d: ImageDescription): string {
  const lines = [
    `image: ${d.filename}`,
    `file format: ${d.format}`,
    `virtual size: ${human(d.virtualSize)} (${d.virtualSize} bytes)`,
    `disk size: ${d.actualSize !== undefined ? human(d.actualSize) : 'unavailable'}`,
  ];
  if (d.clusterSize !== undefined) lines.push(`cluster_size: ${d.clusterSize}`);
  if (d.dirty) lines.push('cleanly shut down: no');
  if (d.backingFile !== undefined) {
    const full = d.fullBackingFile;
    lines.push(
      `backing file: ${d.backingFile}${full !== undefined && full !== d.backingFile ? ` (actual path: ${full})` : ''}`,
    );
  }
  if (d.backingFormat !== undefined) lines.push(`backing file format: ${d.backingFormat}`);
  if (d.formatSpecific) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(d.formatSpecific.data)) lines.push(...humanField(k, v, 4));
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The image file and format an --image-opts string names (a format over a file, as
 * qemu-img completes it); other options are not supported here yet.
 */
async function optsImage(text: string): Promise<{ path: string; format: string }> {
  const o = await nodeOptions({ name: text, imageOpts: true, readOnly: true });
  const { driver, file, ...rest } = o as { driver?: unknown; file?: Record<string, unknown> };
  const { driver: fileDriver, filename, ...fileRest } = file ?? {};
  if (
    typeof driver !== 'string' ||
    !FORMATS.includes(driver) ||
    fileDriver !== 'file' ||
    typeof filename !== 'string' ||
    Object.keys(rest).length > 0 ||
    Object.keys(fileRest).length > 0
  )
    throw new UsageError('info: --image-opts other than a format over a file is not supported yet');
  if (!existsSync(filename))
    throw couldNotOpen(text, Object.assign(new Error('ENOENT'), { code: 'ENOENT' }), filename);
  return { path: filename, format: driver };
}

export async function info(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { path, json, forceShare, format, backingChain, imageOpts, objects } = imageArgs(
    'info',
    argv,
  );
  if (objects.length > 0) throw new UsageError('info: --object is not supported yet');
  const image = imageOpts ? await optsImage(path) : { path, format };
  const chain: ImageDescription[] = [];
  let d = await describe(image.path, forceShare, image.format);
  chain.push(d);
  // --backing-chain: each backing file as its overlay names it, in the format it gives.
  while (backingChain && d.fullBackingFile !== undefined) {
    d = await describe(d.fullBackingFile, forceShare, d.backingFormat);
    chain.push(d);
  }
  if (json) {
    const value = backingChain ? chain.map(infoJson) : infoJson(chain[0]!);
    // QEMU prints an empty list on two lines ("flags": [ then ] below it).
    const text = JSON.stringify(value, null, 4).replace(/^( *)(".*": )\[\]/gm, '$1$2[\n$1]');
    out.write(`${text}\n`);
  } else out.write(chain.map(humanInfo).join('\n'));
  return 0;
}
