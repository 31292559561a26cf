// `vm-disk measure`, as `qemu-img measure`: the size a new image of the -O format (raw or
// qcow2, with -o options) needs, for a virtual size (--size) or to hold an image's data:
// "required" (what the data and metadata take) and "fully allocated" (every cluster
// there), by QEMU's arithmetic (raw_measure, qcow2_measure and qcow2_calc_prealloc_size),
// and the room persistent bitmaps need where the source could have them.
import { schema } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { usage } from '../usage.ts';
import { imgArgs, outputFormat } from './args.ts';
import { imageGraph, openImage } from './open.ts';

const SIZE_HELP =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n' +
  'vm-disk: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
const NUMBER_HELP =
  'expects a non-negative number below 2^64\n' +
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n' +
  'and exabytes, respectively.';

/** The -o options each format takes (its create options and the file protocol's). */
const PROTOCOL = ['size', 'preallocation', 'nocow', 'extent_size_hint'];
const OPTIONS: Record<string, readonly string[]> = {
  raw: PROTOCOL,
  qcow2: [
    ...PROTOCOL,
    'compat',
    'backing_file',
    'backing_fmt',
    'data_file',
    'data_file_raw',
    'encryption',
    'encrypt.format',
    'cluster_size',
    'extended_l2',
    'lazy_refcounts',
    'refcount_bits',
    'compression_type',
  ],
};
const SIZE_OPTIONS = new Set(['size', 'cluster_size', 'extent_size_hint']);
const BOOL_OPTIONS = new Set([
  'nocow',
  'data_file_raw',
  'encryption',
  'extended_l2',
  'lazy_refcounts',
]);
const PREALLOC_MODES = ['off', 'metadata', 'falloc', 'full'];

/** QEMU's QCOW_MAX_L1_SIZE. */
const MAX_L1_SIZE = 0x2000000;

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

/** The -o values (qemu-img accumulates repeated -o), each checked as QEMU's QemuOpts does. */
function parseOptions(format: string, texts: readonly string[]): Map<string, string> {
  const known = OPTIONS[format]!;
  const o = new Map<string, string>();
  for (const text of texts) {
    for (const item of text.split(/,(?!,)/)) {
      if (item === '') continue;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = (eq < 0 ? 'on' : item.slice(eq + 1)).replaceAll(',,', ',');
      let problem: string | undefined;
      if (!known.includes(key)) problem = `Invalid parameter '${key}'`;
      else if (SIZE_OPTIONS.has(key) && schema.parseSize(value) === undefined)
        problem = `Parameter '${key}' ${NUMBER_HELP}`;
      else if (BOOL_OPTIONS.has(key) && value !== 'on' && value !== 'off')
        problem = `Parameter '${key}' expects 'on' or 'off'`;
      else if (key === 'refcount_bits' && !/^\d+$/.test(value))
        problem = `Parameter '${key}' expects a number`;
      if (problem) {
        throw new ImageCommandError(
          `${problem}\nvm-disk: Invalid options for file format '${format}'`,
        );
      }
      o.set(key, value);
    }
  }
  return o;
}

export interface Measure {
  required: number;
  fullyAllocated: number;
  bitmaps?: number | undefined;
}

/** The clusters of data of a source, as qcow2_measure counts them from its block status. */
export type DataCounter = (clusterSize: number) => Promise<number>;

/** qcow2_refcount_metadata_size: refcount blocks and table for `clusters`, at their fixed point. */
function refcountMetadataSize(clusters: number, cs: number, refcountOrder: number): number {
  const perTableCluster = cs / 8;
  const perBlock = (cs * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * cs;
}

/** qcow2_calc_prealloc_size: the file size of a fully allocated qcow2 image. */
function qcow2PreallocSize(size: number, cs: number, refcountOrder: number, extL2: boolean) {
  const aligned = roundUp(size, cs);
  const l2e = extL2 ? 16 : 8;
  let meta = cs; // header
  const nl2e = roundUp(aligned / cs, cs / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / cs, cs / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / cs, cs, refcountOrder);
  return meta + aligned;
}

/** qcow2_measure. `source`: the source's size, its data count, whether it has bitmaps. */
async function measureQcow2(
  o: Map<string, string>,
  size: number,
  source: { size: number; data: DataCounter; bitmaps: boolean } | undefined,
): Promise<Measure> {
  const extL2 = o.get('extended_l2') === 'on';
  const cs = schema.parseSize(o.get('cluster_size') ?? '64k')!;
  if ((cs & (cs - 1)) !== 0 || cs < 512 || cs > 2 << 20)
    throw new ImageCommandError('Cluster size must be a power of two between 512 and 2048k');
  const compat = o.get('compat');
  let version = 3;
  if (compat === '0.10') version = 2;
  else if (compat !== undefined && compat !== '1.1')
    throw new ImageCommandError(`Invalid compatibility level: '${compat}'`);
  const refcountBits = Number(o.get('refcount_bits') ?? 16);
  if (refcountBits > 64 || refcountBits === 0 || (refcountBits & (refcountBits - 1)) !== 0)
    throw new ImageCommandError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && refcountBits !== 16)
    throw new ImageCommandError(
      'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
    );
  const prealloc = o.get('preallocation') ?? 'off';
  if (!PREALLOC_MODES.includes(prealloc))
    throw new ImageCommandError(`invalid parameter value: ${prealloc}`);
  let virtualSize = roundUp(size, cs);
  const l2Tables = Math.ceil(virtualSize / cs / (cs / (extL2 ? 16 : 8)));
  if (l2Tables * 8 > MAX_L1_SIZE)
    throw new ImageCommandError('The image size is too large (try using a larger cluster size)');
  let required = 0;
  if (source) {
    virtualSize = roundUp(source.size, cs);
    // With a backing file nothing is known to be shared: every cluster may be written.
    required = o.has('backing_file') ? virtualSize : await source.data(cs);
  }
  if (prealloc === 'full' || prealloc === 'falloc') required = virtualSize;
  const fullyAllocated = qcow2PreallocSize(virtualSize, cs, Math.log2(refcountBits), extL2);
  return {
    required: fullyAllocated - virtualSize + required,
    fullyAllocated,
    // The room of the source's persistent bitmaps: none yet (bitmaps are not written).
    ...(version >= 3 && source?.bitmaps && { bitmaps: 0 }),
  };
}

export async function measure(
  argv: readonly string[],
  out: NodeJS.WritableStream,
): Promise<number> {
  let parsed: ReturnType<typeof parse>;
  try {
    parsed = parse(argv);
  } catch (e) {
    // qemu-img measure answers an unknown option with its help, and exit status 0.
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`vm-disk: measure: ${e.message}\n`);
    out.write(usage());
    return 0;
  }
  const { values, positionals } = parsed;
  let json: boolean;
  try {
    json = outputFormat(values.output) === 'json';
  } catch (e) {
    throw new ImageCommandError((e as Error).message, { cause: e }); // without a usage hint
  }
  let size = -1;
  if (values.size !== undefined) {
    const n = schema.parseSize(values.size);
    if (n === undefined) throw new ImageCommandError(SIZE_HELP);
    size = n;
  }
  if (positionals.length > 1) throw new UsageError('Expecting one image file name');
  const filename = positionals[0];
  if (filename !== undefined && size !== -1)
    throw new ImageCommandError('--size N cannot be used together with a filename.');
  if (filename === undefined && size === -1)
    throw new ImageCommandError('Either --size N or one filename must be specified.');

  const graph = await imageGraph(values.object);
  try {
    let source: { size: number; data: DataCounter; bitmaps: boolean } | undefined;
    if (filename !== undefined) {
      const backend = await openImage(
        graph,
        {
          name: filename,
          format: values.format,
          imageOpts: values['image-opts'],
          readOnly: true,
          forceShare: values['force-share'],
        },
        'source',
      );
      const ssize = backend.size();
      source = {
        size: ssize,
        // qcow2_measure's loop: data regions rounded out to whole clusters (counting the
        // start of a region's first cluster as QEMU does), holes skipped.
        data: async (cs) => {
          let required = 0;
          for (let offset = 0, pnum = 0; offset < ssize; offset += pnum) {
            const [e] = await backend.blockStatus(offset, ssize - offset);
            pnum = Math.min(e!.length, ssize - offset);
            // Data as QEMU's qcow2 reports it: a data cluster is data even where the file
            // under it has a hole (the graph reports those zero; QEMU does not look).
            if (!e!.hole && e!.depth !== 0) {
              pnum = roundUp(offset + pnum, cs) - offset;
              required += (offset % cs) + pnum;
            }
          }
          return required;
        },
        // Persistent bitmaps: qcow2 v3 has them (QEMU bdrv_supports_persistent_dirty_bitmap).
        bitmaps: graph.query().some((n) => n['node-name'] === 'source' && n.compat === '1.1'),
      };
    }
    const format = values.target ?? 'raw';
    if (!(format in OPTIONS)) {
      throw new ImageCommandError(
        ['vmdk', 'vpc', 'vdi', 'vhdx', 'qed', 'luks', 'qcow', 'parallels'].includes(format)
          ? `Block driver '${format}' does not support size measurement`
          : `Unknown file format '${format}'`,
      );
    }
    const o = parseOptions(format, values.options);
    let m: Measure;
    if (format === 'raw') {
      const required = source ? source.size : roundUp(size, 512);
      m = { required, fullyAllocated: required };
    } else m = await measureQcow2(o, size, source);
    if (json) {
      const j = {
        ...(m.bitmaps !== undefined && { bitmaps: m.bitmaps }),
        required: m.required,
        'fully-allocated': m.fullyAllocated,
      };
      out.write(`${JSON.stringify(j, null, 4)}\n`);
    } else {
      out.write(`required size: ${m.required}\nfully allocated size: ${m.fullyAllocated}\n`);
      if (m.bitmaps !== undefined) out.write(`bitmaps size: ${m.bitmaps}\n`);
    }
    return 0;
  } finally {
    await graph.close();
  }
}

function parse(argv: readonly string[]) {
  return imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    target: { type: 'string', short: 'O' },
    options: { type: 'string', short: 'o', multiple: true, default: [] },
    output: { type: 'string' },
    size: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U', default: false },
    object: { type: 'string', multiple: true, default: [] },
    'image-opts': { type: 'boolean', default: false },
  });
}
