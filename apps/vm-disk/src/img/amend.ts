// `vm-disk amend`, as `qemu-img amend`: a qcow2 image's compat, lazy_refcounts,
// refcount_bits and size changed in place (block-graph's amendQcow2), with qemu-img's
// words for what it refuses and its -p progress.
import { amendQcow2, type Qcow2AmendOptions, Qcow2Error, schema } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { imgArgs } from './args.ts';
import { openImageFile, probeImage } from './image-file.ts';
import { checkCacheMode, imageGraph } from './open.ts';
import { ImgProgress } from './progress.ts';

/** qemu-img's `-o help` for qcow2 (its amend options). */
const HELP = `Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;

/** Options of qcow2 creation that amend refuses as qemu-img does. */
const CREATE_ONLY = [
  'cluster_size',
  'preallocation',
  'extended_l2',
  'compression_type',
  'encryption',
  'encrypt.format',
  'encrypt.key-secret',
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
];
/** Amend options of qemu-img's that vm-disk does not change. */
const NOT_AMENDED = [
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'encrypt.iter-time',
  'encrypt.keyslot',
  'encrypt.new-secret',
  'encrypt.old-secret',
  'encrypt.state',
];

/** KEY=VALUE,... as QEMU's option lists split them (",," is a comma). */
function pairs(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const part of text.replaceAll(',,', '\0').split(',')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? 'on' : part.slice(eq + 1);
    out.push([key, value.replaceAll('\0', ',')]);
  }
  return out;
}

const BOOLS: Record<string, boolean> = {
  on: true,
  yes: true,
  true: true,
  off: false,
  no: false,
  false: false,
};

function amendOptions(text: string): Qcow2AmendOptions {
  const o: Qcow2AmendOptions = {};
  for (const [key, value] of pairs(text)) {
    if (CREATE_ONLY.includes(key)) {
      throw new ImageCommandError(
        `Invalid parameter '${key}'\nThis option is only supported for image creation`,
      );
    }
    switch (key) {
      case 'compat':
        if (value === '0.10' || value === 'v2') o.version = 2;
        else if (value === '1.1' || value === 'v3') o.version = 3;
        else throw new ImageCommandError(`Unknown compatibility level ${value}`);
        break;
      case 'lazy_refcounts': {
        const b = BOOLS[value];
        if (b === undefined)
          throw new ImageCommandError("Parameter 'lazy_refcounts' expects 'on' or 'off'");
        o.lazyRefcounts = b;
        break;
      }
      case 'refcount_bits':
        if (!/^\d+$/.test(value))
          throw new ImageCommandError("Parameter 'refcount_bits' expects a number");
        o.refcountBits = Number(value);
        break;
      case 'size': {
        const size = schema.parseSize(value);
        if (size === undefined)
          throw new ImageCommandError(
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
          );
        o.size = size;
        break;
      }
      default:
        if (NOT_AMENDED.includes(key))
          throw new ImageCommandError(`vm-disk amend does not change '${key}'`);
        throw new ImageCommandError(`Invalid parameter '${key}'`);
    }
  }
  return o;
}

export async function amend(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    options: { type: 'string', short: 'o', multiple: true, default: [] },
    format: { type: 'string', short: 'f' },
    cache: { type: 'string', short: 't' },
    progress: { type: 'boolean', short: 'p', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
    force: { type: 'boolean', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  const text = values.options.join(',');
  if (values.options.length === 0) throw new UsageError('Must specify options (-o)');
  if (pairs(text).some(([k]) => k === 'help')) {
    out.write(HELP);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  checkCacheMode(values.cache);
  const spec = {
    name: positionals[0]!,
    format: values.format,
    imageOpts: values['image-opts'],
    readOnly: false,
    cache: values.cache,
  };
  const options = await probeImage(spec, values.object);
  if (options.driver !== 'qcow2') {
    throw new ImageCommandError(
      `Format driver '${String(options.driver)}' does not support option amendment`,
    );
  }
  const o = amendOptions(text);
  const progress = new ImgProgress(out, values.progress && !values.quiet, undefined, 'amend');
  const graph = await imageGraph(values.object);
  try {
    const file = await openImageFile(graph, spec, options);
    progress.start();
    try {
      await amendQcow2(file, o, (done, total) => progress.update(done, total));
    } catch (e) {
      if (e instanceof Qcow2Error) throw new ImageCommandError(e.message, { cause: e });
      throw e;
    } finally {
      // As qemu-img: the progress ends at 100% whether the amend succeeded or not.
      progress.update(1, 1);
      progress.end();
    }
    return 0;
  } finally {
    await graph.close();
  }
}
