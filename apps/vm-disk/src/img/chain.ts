// The backing chain of an image as the subcommands that change it see it (commit, rebase,
// info --backing-chain): each layer's file and format, read once with the chain opened
// read-only, then opened again with the layers the subcommand writes opened read-write
// (a backing file is otherwise opened read-only, as QEMU opens it).
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import type { BlockGraph, ChildNode } from '@vmdisk/block-graph';
import { couldNotOpen, type ImageSpec, nodeOptions } from './open.ts';

export interface Layer {
  /** The node's name in the graph (layer0 is the image, layer1 its backing file...). */
  nodeName: string;
  /** The file name as opened: as given for the image, resolved for its backing files. */
  filename: string;
  format: string;
  /** The backing file name and format the header gives, if any. */
  backingName?: string | undefined;
  backingFormat?: string | undefined;
  size: number;
}

/** The layers of the chain opened in `graph` under `top`, top first. */
export function layersOf(graph: BlockGraph, top: string): Layer[] {
  const info = new Map(graph.query().map((n) => [n['node-name'], n]));
  const layers: Layer[] = [];
  for (let n: ChildNode | undefined = graph.node(top); n; n = n.backing?.node) {
    let file: ChildNode | undefined = n;
    while (file && file.filename === undefined) file = file.primary?.node;
    const i = info.get(n.name);
    const str = (v: unknown) => (typeof v === 'string' ? v : undefined);
    layers.push({
      nodeName: n.name,
      filename: file?.filename ?? n.name,
      format: n.driver,
      backingName: str(i?.['backing-filename']),
      backingFormat: str(i?.['backing-filename-format']),
      size: n.size(),
    });
  }
  return layers;
}

/**
 * Options opening `layers` (as layersOf found them, from the image `spec` names) as one
 * chain, layer i as node `layer<i>`, read-write where `writable(i)`, the rest read-only.
 */
export async function chainOptions(
  spec: ImageSpec,
  layers: readonly Layer[],
  writable: (i: number) => boolean,
  bottom: number = layers.length - 1,
): Promise<Record<string, unknown>> {
  const kv = spec.imageOpts === true;
  const flag = (b: boolean) => (kv ? (b ? 'on' : 'off') : b);
  const cache = spec.cache === 'none' || spec.cache === 'directsync';
  let below: Record<string, unknown> | null = null;
  for (let i = bottom; i >= 1; i--) {
    const l = layers[i]!;
    below = {
      driver: l.format,
      'node-name': `layer${i}`,
      'read-only': flag(!writable(i)),
      file: {
        driver: 'file',
        filename: l.filename,
        ...(cache && { cache: { direct: flag(true) } }),
      },
      ...(l.format === 'qcow2' && { backing: below }),
    };
  }
  const top = await nodeOptions({ ...spec, backing: true });
  return {
    ...top,
    'node-name': 'layer0',
    'read-only': flag(!writable(0)),
    ...(top.driver === 'qcow2' && { backing: below }),
  };
}

/** Opens the chain of `spec` read-only in `graph` (node layer0) and reads its layers. */
export async function readChain(graph: BlockGraph, spec: ImageSpec): Promise<Layer[]> {
  try {
    const options = await nodeOptions(spec);
    await graph.add(
      {
        ...options,
        'node-name': 'layer0',
        'read-only': spec.imageOpts ? 'on' : true,
        ...(spec.forceShare && { 'force-share': spec.imageOpts ? 'on' : true }),
      },
      { syntax: spec.imageOpts ? 'keyval' : 'json' },
    );
  } catch (e) {
    throw couldNotOpen(spec.name, e);
  }
  return layersOf(graph, 'layer0');
}

/**
 * The layer below `layers[0]` that `name` designates (QEMU bdrv_find_backing_image): the
 * backing file name a header gives, or the same file as `name` resolved against the
 * directory of the layer above; -1 when none is.
 */
export async function findBackingImage(layers: readonly Layer[], name: string): Promise<number> {
  const real = (p: string) => realpath(p).catch(() => resolve(p));
  for (let i = 1; i < layers.length; i++) {
    const above = layers[i - 1]!;
    if (above.backingName === name) return i;
    const path = isAbsolute(name) ? name : resolve(dirname(above.filename), name);
    if ((await real(path)) === (await real(layers[i]!.filename))) return i;
  }
  return -1;
}
