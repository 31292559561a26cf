// Opening images as qemu-img does, shared by every image subcommand: a file name (its
// format probed from its first bytes unless -f), an `nbd://` or `nbd+unix://` URI, or with
// --image-opts a set of block-graph options; --object values go to the graph first.
import { type BlockBackend, BlockGraph, ImageLockError, schema } from '@vmdisk/block-graph';
import { type EngineFile, sharedEngine } from '@vmdisk/engine';
import { BadOptionError, ImageCommandError, UsageError } from '../errors.ts';
import { parseKeyval } from '../options/keyval.ts';
import { rbdFilename } from './rbd-name.ts';

const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');
const BOCHS_MAGIC = Buffer.from('Bochs Virtual HD Image');

export type Format = 'qcow2' | 'raw' | 'bochs';
export const FORMATS: readonly string[] = ['qcow2', 'raw', 'bochs'];

export function sizeArg(option: string, text: string): number {
  const size = schema.parseSize(text);
  if (size === undefined)
    throw new BadOptionError(option, `'${text}' is not a size (e.g. 64M, 10G)`);
  return size;
}

export async function openFile(
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

/** A lock refusal as qemu-img words it: "Could not open 'PATH': Failed to get ... lock". */
export function couldNotOpen(path: string, e: unknown, file = path): unknown {
  if (e instanceof ImageLockError)
    return new ImageLockError(`Could not open '${path}': ${e.message}`, path, { cause: e });
  const err = e as { code?: string; errnoName?: string };
  if (err.code === 'ENOENT' || err.errnoName === 'ENOENT') {
    // qemu-img's words, then the file driver's (raw_open): both name the file.
    return new Error(
      `Could not open '${path}': Could not open '${file}': No such file or directory`,
      { cause: e },
    );
  }
  return e;
}

/**
 * The protocol node of an `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`
 * URI (QEMU's nbd URI syntax), or undefined for anything else.
 */
export function nbdUri(text: string): Record<string, unknown> | undefined {
  const m = /^nbd(\+tcp|\+unix)?:\/\/([^/?]*)(\/[^?]*)?(?:\?(.*))?$/.exec(text);
  if (!m) return undefined;
  const [, transport, authority = '', path = '', query = ''] = m;
  const name = decodeURIComponent(path.replace(/^\//, ''));
  const exp = name === '' ? {} : { export: name };
  if (transport === '+unix') {
    const socket = new URLSearchParams(query).get('socket');
    if (!socket) throw new UsageError(`${text}: the nbd+unix URI needs ?socket=PATH`);
    return { driver: 'nbd', server: { type: 'unix', path: socket }, ...exp };
  }
  const hp = /^(\[[^\]]+\]|[^:]*)(?::(\d+))?$/.exec(authority);
  const host = (hp?.[1] ?? '').replace(/^\[|\]$/g, '') || 'localhost';
  return { driver: 'nbd', server: { type: 'inet', host, port: hp?.[2] ?? '10809' }, ...exp };
}

/** How one image of a subcommand is named and opened. */
export interface ImageSpec {
  /** A file name, an nbd URI, or (imageOpts) block-graph options as key=value,... */
  name: string;
  /** -f / -F / -O; probed from a file's first bytes when absent (raw over NBD). */
  format?: string | undefined;
  imageOpts?: boolean | undefined;
  readOnly: boolean;
  /** -U: others may write it (a format image another process writes is otherwise refused). */
  forceShare?: boolean | undefined;
  /** Open a qcow2 image's backing file (default true). */
  backing?: boolean | undefined;
  /** qemu-img's cache mode (-t / -T): none and directsync bypass the page cache. */
  cache?: string | undefined;
}

const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

export function checkCacheMode(mode: string | undefined): void {
  if (mode !== undefined && !CACHE_MODES.includes(mode))
    throw new UsageError(`Invalid cache option: ${mode}`);
}

/** The options of the node `spec` names, without node-name. */
export async function nodeOptions(spec: ImageSpec): Promise<Record<string, unknown>> {
  // The cache options -t/-T stand for (none: the node's defaults).
  const cache: Record<string, boolean> | undefined =
    spec.cache === 'none' || spec.cache === 'directsync'
      ? { direct: true }
      : spec.cache === 'unsafe'
        ? { 'no-flush': true }
        : undefined;
  if (spec.imageOpts) {
    if (spec.format !== undefined)
      throw new UsageError('--image-opts and --format are mutually exclusive');
    // As qemu-img: the cache mode is the top node's default (its children inherit it);
    // cache.* options the string gives win.
    const node = await imageOptsNode(spec.name);
    const given = node.cache ?? {};
    // A cache that is no object is the graph's to refuse.
    if (!cache || typeof given !== 'object' || given === null) return node;
    // The string's syntax is keyval: its values are strings.
    const keyval = Object.fromEntries(Object.keys(cache).map((k) => [k, 'on']));
    return { ...node, cache: { ...keyval, ...given } };
  }
  if (spec.format !== undefined && !FORMATS.includes(spec.format))
    throw new UsageError(`Unknown file format '${spec.format}'`);
  const remote = nbdUri(spec.name) ?? rbdFilename(spec.name);
  const file = remote ?? { driver: 'file', filename: spec.name, ...(cache && { cache }) };
  let format = spec.format;
  if (format === undefined) format = remote ? 'raw' : await probeFormat(spec.name);
  return {
    driver: format,
    file,
    ...(format === 'qcow2' && spec.backing === false && { backing: null }),
  };
}

/**
 * The node an --image-opts string names, completed as QEMU's bdrv_fill_options does: a
 * `file` given by its filename alone is a file node, the format is probed from the file
 * when no driver is given. Refused with qemu-img's words ("Could not open 'OPTS': ...").
 */
async function imageOptsNode(text: string): Promise<Record<string, unknown>> {
  const fail = (why: string) => new ImageCommandError(`Could not open '${text}': ${why}`);
  const reference = (name: string) => fail(`Cannot find device='${name}' nor node-name='${name}'`);
  if (!text.includes('=') && !text.includes(',')) throw reference(text);
  const o: Record<string, unknown> = parseKeyval(text);
  const file = o.file;
  if (typeof file === 'string') throw reference(file);
  if (o.driver === undefined && file === undefined)
    throw fail('Must specify either driver or file');
  if (file === undefined) {
    if (typeof o.driver === 'string' && FORMATS.includes(o.driver))
      throw fail('A block device must be specified for "file"');
    return o;
  }
  const f = { ...(file as Record<string, unknown>) };
  if (f.driver === undefined && typeof f.filename === 'string') f.driver = 'file';
  if (o.driver === undefined && f.driver === 'file' && typeof f.filename === 'string') {
    const filename = f.filename;
    const driver = await probeFormat(filename).catch((e: unknown) => {
      throw couldNotOpen(text, e, filename);
    });
    return { driver, ...o, file: f };
  }
  return { ...o, file: f };
}

/**
 * A subcommand's graph: its process serves nothing else, so a file's block status
 * (SEEK_DATA/SEEK_HOLE) is asked on the event loop's thread where the filesystem answers
 * it quickly, as qemu-img does, rather than through a thread-pool round trip each.
 */
const IMAGE_GRAPH_OPTIONS = { inlineSeeks: true } as const;

/** A graph of one subcommand, with its --object values added. */
export async function imageGraph(objects: readonly string[] = []): Promise<BlockGraph> {
  const graph = new BlockGraph(IMAGE_GRAPH_OPTIONS);
  try {
    for (const text of objects)
      await graph.addObject(parseKeyval(text, 'qom-type'), { syntax: 'keyval' });
  } catch (e) {
    await graph.close();
    throw e;
  }
  return graph;
}

/**
 * Opens `spec` as node `nodeName` of `graph` and a backend on it: reading only, or
 * writing (nobody else may write it); with forceShare others may write it too.
 */
export async function openImage(
  graph: BlockGraph,
  spec: ImageSpec,
  nodeName: string,
): Promise<BlockBackend> {
  try {
    const options = await nodeOptions(spec);
    await graph.add(
      {
        ...options,
        'node-name': nodeName,
        'read-only': spec.readOnly,
        ...(spec.forceShare && { 'force-share': true }),
      },
      { syntax: spec.imageOpts ? 'keyval' : 'json' },
    );
    return await graph.createBackend(nodeName, {
      name: nodeName,
      maxExtents: 65536,
      ...(spec.readOnly
        ? {
            perm: ['consistent-read'],
            shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
          }
        : { write: true }),
    });
  } catch (e) {
    throw couldNotOpen(spec.name, e, spec.imageOpts ? optsFilename(spec.name) : spec.name);
  }
}

/** The file name an --image-opts string gives (file.filename or filename). */
function optsFilename(text: string): string {
  try {
    const o = parseKeyval(text) as { filename?: unknown; file?: { filename?: unknown } };
    const name = o.file?.filename ?? o.filename;
    return typeof name === 'string' ? name : text;
  } catch {
    return text;
  }
}

/**
 * Opens the image at `path` read-only in a graph of its own, as qemu-img opens what it reads:
 * its image locks taken, so that a format image another process writes is refused (its
 * format node shares no write of the file it owns) unless `forceShare` (qemu-img's -U). A
 * raw image is never refused: nobody owns its metadata. Without `backing`, a qcow2 image's
 * backing file is not opened.
 */
export async function openForReading(
  path: string,
  format: Format,
  forceShare: boolean,
  backing: boolean,
): Promise<BlockGraph> {
  const graph = new BlockGraph(IMAGE_GRAPH_OPTIONS);
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
