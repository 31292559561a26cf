// `vm-disk info`, as `qemu-img info`: format, sizes, backing file, qcow2 features.
import { stat } from 'node:fs/promises';
import { type BlockGraph, parseQcow2Header, qcow2BitmapInfoList } from '@vmdisk/block-graph';
import { imageArgs } from './args.ts';
import { humanField } from './human-value.ts';
import { type Format, openFile, openForReading, probeFormat } from './open.ts';

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

export async function info(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { path, json, forceShare } = imageArgs('info', argv);
  const d = await describe(path, forceShare);
  if (json) {
    // QEMU prints an empty list on two lines ("flags": [ then ] below it).
    const text = JSON.stringify(infoJson(d), null, 4).replace(/^( *)(".*": )\[\]/gm, '$1$2[\n$1]');
    out.write(`${text}\n`);
    return 0;
  }
  const lines = [
    `image: ${d.filename}`,
    `file format: ${d.format}`,
    `virtual size: ${human(d.virtualSize)} (${d.virtualSize} bytes)`,
    `disk size: ${human(d.actualSize)}`,
  ];
  if (d.clusterSize !== undefined) lines.push(`cluster_size: ${d.clusterSize}`);
  if (d.dirty) lines.push('cleanly shut down: no');
  if (d.backingFile !== undefined) lines.push(`backing file: ${d.backingFile}`);
  if (d.backingFormat !== undefined) lines.push(`backing file format: ${d.backingFormat}`);
  if (d.formatSpecific) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(d.formatSpecific.data)) lines.push(...humanField(k, v, 4));
  }
  out.write(`${lines.join('\n')}\n`);
  return 0;
}
