// `vm-disk create`, as `qemu-img create`: raw and qcow2 images, every option checked
// before anything is made.
import { open, stat, unlink } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import {
  checkQcow2CreateOptions,
  createQcow2,
  createRbd,
  lockForCreate,
  type Qcow2CreateOptions,
  type RbdLocation,
  schema,
} from '@vmdisk/block-graph';
import { type EngineFile, sharedEngine } from '@vmdisk/engine';
import { BadOptionError, VmDiskError } from '../errors.ts';
import { parseKeyval } from '../options/keyval.ts';
import { ProgressBar } from '../progress.ts';
import { imgArgs } from './args.ts';
import { describe } from './info.ts';
import { openFile, sizeArg } from './open.ts';
import { rbdFilename } from './rbd-name.ts';

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
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f', default: 'raw' },
    options: { type: 'string', short: 'o', multiple: true, default: [] },
    backing: { type: 'string', short: 'b' },
    'backing-format': { type: 'string', short: 'F' },
    quiet: { type: 'boolean', short: 'q' },
  });
  const [path, sizeText, ...extra] = positionals;
  if (!path) throw new BadOptionError('create', 'expected FILE [SIZE]');
  if (extra.length > 0) throw new BadOptionError('create', `unexpected argument '${extra[0]}'`);
  await createImage({
    path,
    format: values.format,
    options: values.options,
    size: sizeText !== undefined ? sizeArg('SIZE', sizeText) : undefined,
    backingFile: values.backing,
    backingFormat: values['backing-format'],
    ...(!values.quiet && { out }),
  });
  return 0;
}

/** What createImage makes. */
export interface CreateRequest {
  path: string;
  format: string;
  /** -o values (key=value,...), qemu-img's create options of the format. */
  options: readonly string[];
  /** The virtual size; else -o size, else the backing file's. */
  size?: number | undefined;
  backingFile?: string | undefined;
  backingFormat?: string | undefined;
  /** Where "Formatting ..." is written (and a progress bar shown); absent: quiet. */
  out?: NodeJS.WritableStream;
}

/**
 * Makes an image as `qemu-img create` does (convert makes its target with it too): every
 * option is checked before anything is created, so that a refused create leaves nothing
 * behind; a create that fails later removes the file it made (never one that was there
 * before).
 */
export async function createImage(req: CreateRequest): Promise<void> {
  const { path, format, out } = req;
  if (format !== 'raw' && format !== 'qcow2')
    throw new BadOptionError('-f', `cannot create '${format}' images (raw, qcow2)`);
  const o: Record<string, string> = {};
  for (const text of req.options) {
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
  if (rbdFilename(path) !== undefined) return createRbdImage(req, o);
  const allowed = format === 'qcow2' ? QCOW2_OPTIONS : new Set(['size', 'preallocation']);
  for (const key of Object.keys(o)) {
    if (!allowed.has(key))
      throw new BadOptionError('-o', `Invalid parameter '${key}' for ${format}`);
  }
  const backingFile = req.backingFile ?? o.backing_file;
  const backingFormat = req.backingFormat ?? o.backing_fmt;
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
  let size = req.size ?? optionSize;
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
  out?.write(`Formatting '${path}', fmt=${format}${shown} size=${size}\n`);

  const bar = out && preallocation !== 'off' ? new ProgressBar(`preallocating ${path}`) : undefined;
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

/**
 * `create -f raw rbd:POOL/IMAGE SIZE` (qemu-img's rbd create options: size, cluster_size):
 * a new RBD image; a format on top of it is not made here.
 */
async function createRbdImage(req: CreateRequest, o: Record<string, string>): Promise<void> {
  if (req.format !== 'raw')
    throw new BadOptionError(
      '-f',
      `rbd images are created raw (a ${req.format} on rbd is not made here)`,
    );
  for (const key of Object.keys(o)) {
    if (key !== 'size' && key !== 'cluster_size')
      throw new BadOptionError('-o', `Invalid parameter '${key}' for rbd`);
  }
  const size = req.size ?? (o.size !== undefined ? sizeOption('size', o.size) : undefined);
  if (size === undefined) throw new BadOptionError('create', 'expected an image size');
  const clusterSize =
    o.cluster_size !== undefined ? sizeOption('cluster_size', o.cluster_size) : undefined;
  const { driver: _driver, ...location } = rbdFilename(req.path) as Record<string, unknown>;
  const shown = clusterSize !== undefined ? ` cluster_size=${clusterSize}` : '';
  req.out?.write(`Formatting '${req.path}', fmt=raw size=${size}${shown}\n`);
  try {
    await createRbd(location as RbdLocation, size, clusterSize, (id) => {
      throw new BadOptionError('key-secret', `no secret object with id '${id}'`);
    });
  } catch (e) {
    // qemu-img's words: the image name, then the driver's message (the code is kept).
    if (e instanceof Error) e.message = `${req.path}: ${e.message}`;
    throw e;
  }
}
