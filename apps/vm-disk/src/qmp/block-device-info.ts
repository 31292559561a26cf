// query-named-block-nodes in QEMU 7.2's BlockDeviceInfo shape (block/qapi.c
// bdrv_block_device_info, bdrv_query_image_info), from each node's real settings and
// image: its file name as bdrv_refresh_filename makes it (the plain file name, or a
// json: one when options or an overridden backing make the node more than its file),
// detect_zeroes, cache, backing_file and depth, and the ImageInfo chain (actual-size,
// cluster-size, dirty-flag, qcow2's format-specific, backing-image). The graph's own
// fields (children, permissions, refcount, driver facts) come along after QEMU's.
import { fstat } from 'node:fs';
import { promisify } from 'node:util';
import type { BlockGraph, NodeInfo } from '@vmdisk/block-graph';
import { fullBackingName } from '../img/info.ts';

/** blkdebug's strong options besides config (a node with any has no plain filename). */
const BLKDEBUG_STRONG = [
  'inject-error',
  'set-state',
  'align',
  'max-transfer',
  'opt-write-zero',
  'max-write-zero',
  'opt-discard',
  'max-discard',
];
const fstatAsync = promisify(fstat);

/** QEMU's drivers with is_filter set: their filtered child stands for them. */
const FILTERS = new Set([
  'throttle',
  'copy-on-read',
  'copy-before-write',
  'blkdebug',
  'preallocate',
  'compress',
  'mirror_top',
  'commit_top',
]);

/** Job filters that take the file name of the node they sit on (their refresh_filename). */
const NAMED_AFTER_CHILD = new Set(['mirror_top', 'commit_top']);

/** Protocol drivers (bdrv_file_open): a format over one of them may take its file name. */
const PROTOCOLS = new Set(['file', 'null-co', 'nbd']);

/** Options that make a node differ from what its file name alone opens (strong_runtime_opts). */
const STRONG: Record<string, readonly string[]> = {
  raw: ['offset', 'size'],
  throttle: ['throttle-group'],
  'null-co': ['size', 'read-zeroes'],
  nbd: ['server', 'export', 'tls-creds', 'tls-authz'],
  blkdebug: ['config', 'inject-error', 'set-state', 'align', 'max-transfer'],
};

/**
 * The bucket QEMU's QDict puts a key in (tdb_hash modulo 512): a QDict, hence a json:
 * file name, lists its keys in bucket order.
 */
function qdictBucket(key: string): number {
  let v = Math.imul(0x238f13af, key.length) >>> 0;
  const bytes = Buffer.from(key);
  for (let i = 0; i < bytes.length; i++) v = (v + (bytes[i]! << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

/** QEMU's qobject_to_json (compact): `{"a": 1, "b": [2, 3]}`, a dict's keys in QDict order. */
function qobjectJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(qobjectJson).join(', ')}]`;
  if (typeof v === 'object' && v !== null) {
    const keys = Object.keys(v).sort((a, b) => qdictBucket(a) - qdictBucket(b));
    const o = v as Record<string, unknown>;
    return `{${keys.map((k) => `${JSON.stringify(k)}: ${qobjectJson(o[k])}`).join(', ')}}`;
  }
  return JSON.stringify(v);
}

type ImageInfo = Record<string, unknown>;

/**
 * An option's value as QEMU keeps it, typed: the command line's keyval strings (offset=512,
 * read-zeroes=on) become the numbers and booleans the schema makes of them.
 */
function typed(v: unknown): unknown {
  if (typeof v !== 'string') return v;
  if (/^\d+$/.test(v)) return Number(v);
  if (v === 'on' || v === 'off') return v === 'on';
  return v;
}

/** What one query sees of the graph: nodes by name, with their options. */
class Nodes {
  private readonly byName: Map<string, NodeInfo>;
  private readonly names = new Map<string, string>();

  constructor(
    private readonly graph: BlockGraph,
    nodes: NodeInfo[],
  ) {
    this.byName = new Map(nodes.map((n) => [n['node-name'], n]));
  }

  private childWith(n: NodeInfo, role: string): NodeInfo | undefined {
    const edge = n.children.find((c) => c.role.includes(role));
    return edge && this.byName.get(edge['node-name']);
  }

  private options(n: NodeInfo): Readonly<Record<string, unknown>> {
    return this.graph.nodeConfig(n['node-name']).options;
  }

  /** The backing (cow) child. */
  cow(n: NodeInfo): NodeInfo | undefined {
    return this.childWith(n, 'cow');
  }

  /** bdrv_filter_or_cow_bs: a filter's filtered child, else the backing child. */
  filterOrCow(n: NodeInfo): NodeInfo | undefined {
    return FILTERS.has(n.driver) ? this.childWith(n, 'filtered') : this.cow(n);
  }

  /** The backing file name the image's header gives ('' for none). */
  private headerBacking(n: NodeInfo): string {
    return typeof n['backing-filename'] === 'string' ? n['backing-filename'] : '';
  }

  /**
   * bdrv_backing_overridden: the backing is not what the header alone opens. A backing
   * opened from the header is its own reference; one given names the header's string.
   */
  private backingOverridden(n: NodeInfo): boolean {
    const cow = this.cow(n);
    if (!cow) return this.headerBacking(n) !== '';
    if (this.options(n).backing === undefined) return false;
    return this.headerBacking(n) !== this.filename(cow);
  }

  private strongOptions(n: NodeInfo): Record<string, unknown> {
    const options = this.options(n);
    const strong: Record<string, unknown> = {};
    for (const key of ['filename', ...(STRONG[n.driver] ?? [])]) {
      if (options[key] !== undefined) strong[key] = typed(options[key]);
    }
    return strong;
  }

  /** bs->full_open_options: driver, strong options, children (backing when overridden). */
  fullOpenOptions(n: NodeInfo): Record<string, unknown> {
    const overridden = this.backingOverridden(n);
    const opts: Record<string, unknown> = { driver: n.driver, ...this.strongOptions(n) };
    for (const c of n.children) {
      if (c.role.includes('cow') && !overridden) continue;
      const child = this.byName.get(c['node-name']);
      if (child) opts[c.child] = this.fullOpenOptions(child);
    }
    if (overridden && !this.cow(n)) opts.backing = null;
    return opts;
  }

  /** bs->exact_filename: what opens this node alone, if a plain file name does. */
  private exactFilename(n: NodeInfo): string | undefined {
    const options = this.options(n);
    if (n.driver === 'file') return typeof n.file === 'string' ? n.file : undefined;
    if (n.driver === 'null-co') {
      const plain = Object.keys(options).every((k) =>
        ['driver', 'node-name', 'filename', 'latency-ns'].includes(k),
      );
      return plain ? 'null-co://' : undefined;
    }
    if (n.driver === 'blkdebug') {
      // blkdebug_refresh_filename: "blkdebug:CONFIG:FILE" unless a rule or limit is set.
      if (BLKDEBUG_STRONG.some((k) => options[k] !== undefined)) return undefined;
      const image = this.childWith(n, 'filtered');
      const below = image && this.exactFilename(image);
      const config = typeof options.config === 'string' ? options.config : '';
      return below === undefined ? undefined : `blkdebug:${config}:${below}`;
    }
    if (NAMED_AFTER_CHILD.has(n.driver)) {
      const filtered = this.childWith(n, 'filtered');
      return filtered && this.filename(filtered);
    }
    if (FILTERS.has(n.driver) || PROTOCOLS.has(n.driver)) return undefined;
    const primary = this.childWith(n, 'primary');
    if (!primary || !PROTOCOLS.has(primary.driver)) return undefined;
    const strong = Object.keys(this.strongOptions(n)).length > 0;
    if (strong || this.backingOverridden(n)) return undefined;
    return this.exactFilename(primary);
  }

  /** bs->filename. */
  filename(n: NodeInfo): string {
    const known = this.names.get(n['node-name']);
    if (known !== undefined) return known;
    const name = this.exactFilename(n) ?? `json:${qobjectJson(this.fullOpenOptions(n))}`;
    this.names.set(n['node-name'], name);
    return name;
  }

  /** bdrv_get_allocated_file_size (undefined: not supported, as nbd). */
  async allocatedSize(n: NodeInfo): Promise<number | undefined> {
    if (n.driver === 'file') {
      return typeof n.fd === 'number' ? (await fstatAsync(n.fd)).blocks * 512 : undefined;
    }
    if (n.driver === 'null-co') return 0;
    if (PROTOCOLS.has(n.driver)) return undefined;
    if (FILTERS.has(n.driver)) {
      const filtered = this.childWith(n, 'filtered');
      return filtered && this.allocatedSize(filtered);
    }
    let sum = 0;
    for (const c of n.children) {
      if (!c.role.some((r) => r === 'data' || r === 'metadata' || r === 'filtered')) continue;
      const child = this.byName.get(c['node-name']);
      const size = child && (await this.allocatedSize(child));
      if (size === undefined) return undefined;
      sum += size;
    }
    return sum;
  }

  /** bdrv_get_info: cluster size and dirty flag (undefined: not supported). */
  private driverInfo(n: NodeInfo): { clusterSize?: number; dirty: boolean } | undefined {
    if (n.driver === 'file' || n.driver === 'raw') return { dirty: false };
    if (n.driver === 'qcow2') {
      return { clusterSize: Number(n['cluster-size']), dirty: n['dirty-flag'] === true };
    }
    if (FILTERS.has(n.driver)) {
      const filtered = this.childWith(n, 'filtered');
      return filtered && this.driverInfo(filtered);
    }
    return undefined;
  }

  /** ImageInfo: the node's, then its backing chain's (through filters) as backing-image. */
  async imageInfo(n: NodeInfo, flat = false): Promise<ImageInfo> {
    const filename = this.filename(n);
    const actual = await this.allocatedSize(n);
    const info = this.driverInfo(n);
    const header = this.headerBacking(n);
    const image: ImageInfo = {
      filename,
      format: n.driver,
      // bdrv_getlength: whole sectors.
      'virtual-size': Math.ceil(n.size / 512) * 512,
      ...(actual !== undefined && { 'actual-size': actual }),
      ...(info?.clusterSize !== undefined && { 'cluster-size': info.clusterSize }),
      ...(info !== undefined && { 'dirty-flag': info.dirty }),
      ...(n.driver === 'qcow2' && { 'format-specific': qcow2Specific(n) }),
    };
    if (header !== '') {
      const file = this.childWith(n, 'primary');
      image['backing-filename'] = header;
      image['full-backing-filename'] = fullBackingName(
        file ? this.filename(file) : filename,
        header,
      );
      if (typeof n['backing-filename-format'] === 'string') {
        image['backing-filename-format'] = n['backing-filename-format'];
      }
    }
    const below = flat ? undefined : this.filterOrCow(n);
    if (below) image['backing-image'] = await this.imageInfo(below);
    return image;
  }

  /** bdrv_get_backing_file_depth: filters and backing files below. */
  depth(n: NodeInfo): number {
    const below = this.filterOrCow(n);
    return below ? 1 + this.depth(below) : 0;
  }
}

function qcow2Specific(n: NodeInfo): Record<string, unknown> {
  const v3 = n.compat === '1.1';
  const data: Record<string, unknown> = v3
    ? {
        compat: n.compat,
        'compression-type': n['compression-type'],
        'lazy-refcounts': n['lazy-refcounts'],
        'refcount-bits': n['refcount-bits'],
        corrupt: n.corrupt,
        'extended-l2': n['extended-l2'],
      }
    : { compat: n.compat, 'compression-type': 'zlib', 'refcount-bits': n['refcount-bits'] };
  return { type: 'qcow2', data };
}

/**
 * The graph's nodes as query-named-block-nodes answers, newest first as QEMU lists them:
 * QEMU's BlockDeviceInfo members, then vm-disk's own (children, perm, parents...).
 * `flat` (QEMU's): each node's own image only, no backing-image chain, depth 0.
 */
export async function namedBlockNodes(
  graph: BlockGraph,
  flat = false,
): Promise<Record<string, unknown>[]> {
  const list = graph.query();
  const nodes = new Nodes(graph, list);
  const out: Record<string, unknown>[] = [];
  for (const n of list.reverse()) {
    const {
      'node-name': name,
      driver,
      size: _size,
      'read-only': ro,
      'cache-direct': _direct,
      'write-threshold': writeThreshold,
      ...ours
    } = n;
    const { settings } = graph.nodeConfig(name);
    const cow = nodes.cow(n);
    out.push({
      'node-name': name,
      drv: driver,
      ro,
      file: nodes.filename(n),
      encrypted: false,
      backing_file_depth: flat ? 0 : nodes.depth(n),
      ...(cow && { backing_file: nodes.filename(cow) }),
      detect_zeroes: settings.detectZeroes,
      // A node has no BlockBackend's write cache setting of its own: writeback, as QEMU's.
      cache: { writeback: true, direct: settings.direct, 'no-flush': settings.noFlush },
      image: await nodes.imageInfo(n, flat),
      // I/O limits are a BlockBackend's (a device's), never a named node's: zero.
      bps: 0,
      bps_rd: 0,
      bps_wr: 0,
      iops: 0,
      iops_rd: 0,
      iops_wr: 0,
      write_threshold: writeThreshold,
      ...ours,
    });
  }
  return out;
}
