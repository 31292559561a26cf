// `vm-disk rebase`, as `qemu-img rebase`: another backing file for an image. Safe mode
// keeps what the image reads: where the image has nothing of its own and the old and new
// backing files differ, the old data is copied into it first (512-byte runs, as qemu-img
// compares them); when the new backing file is in the old chain, only where the layers
// above it have data. Then the header names the new backing file (-b '' : none). Unsafe
// mode (-u) only rewrites the header, without opening the backing files.
import { dirname, isAbsolute, join } from 'node:path';
import { type BlockBackend, type BlockGraph, changeBackingFile } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { imgArgs } from './args.ts';
import { findBackingImage, layersOf } from './chain.ts';
import {
  checkCacheMode,
  couldNotOpen,
  FORMATS,
  type ImageSpec,
  imageGraph,
  nodeOptions,
  openImage,
} from './open.ts';
import { ImgProgress } from './progress.ts';

const IO_BUF_SIZE = 2 << 20;
const SECTOR = 512;
const f = Math.fround;

export async function rebase(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    'backing-format': { type: 'string', short: 'F' },
    backing: { type: 'string', short: 'b' },
    unsafe: { type: 'boolean', short: 'u', default: false },
    progress: { type: 'boolean', short: 'p', default: false },
    cache: { type: 'string', short: 't' },
    'source-cache': { type: 'string', short: 'T' },
    quiet: { type: 'boolean', short: 'q', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    object: { type: 'string', multiple: true, default: [] },
    'image-opts': { type: 'boolean', default: false },
  });
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const backing = values.backing;
  const unsafe = values.unsafe;
  if (!unsafe && backing === undefined)
    throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
  const filename = positionals[0]!;
  const backingFormat = values['backing-format'];
  const progress = new ImgProgress(
    out,
    values.progress && !values.quiet,
    createLogger(),
    'rebase',
    2,
  );
  progress.start();
  const graph = await imageGraph(values.object);
  try {
    checkCacheMode(values.cache);
    if (values['source-cache'] !== undefined) {
      try {
        checkCacheMode(values['source-cache']);
      } catch {
        throw new ImageCommandError(`Invalid source cache option: ${values['source-cache']}`);
      }
    }
    const spec: ImageSpec = {
      name: filename,
      format: values.format,
      imageOpts: values['image-opts'],
      readOnly: false,
      cache: values.cache,
      // Unsafe: the old backing file may be gone (renamed, moved): it is not opened.
      backing: !unsafe,
    };
    const top = await openImage(graph, spec, 'layer0');
    if (backingFormat !== undefined && !FORMATS.includes(backingFormat))
      throw new ImageCommandError(`Invalid format name: '${backingFormat}'`);
    if (!unsafe) {
      const source: ImageSpec = {
        name: '',
        format: backingFormat,
        readOnly: true,
        forceShare: values['force-share'],
        cache: values['source-cache'] ?? 'writeback',
      };
      await copyDifferences(graph, top, filename, backing!, source, progress);
    }
    await top.close();
    try {
      if (backing) {
        // QEMU requires the format of a backing file it writes into a header.
        if (backingFormat === undefined) throw new Error('backing format must be specified');
        await changeBackingFile(graph, 'layer0', backing, backingFormat);
      } else {
        await changeBackingFile(graph, 'layer0', null, null);
      }
    } catch (e) {
      progress.update(1, 1);
      throw new ImageCommandError(
        `Could not change the backing file to '${backing ?? ''}': ${(e as Error).message}`,
        { cause: e },
      );
    }
    progress.update(1, 1);
  } finally {
    await graph.close();
    progress.end();
  }
  return 0;
}

/**
 * Safe mode: copies into the image what its old backing chain reads differently from the
 * new backing file `backing` ('' : none), where the image has nothing of its own.
 */
async function copyDifferences(
  graph: BlockGraph,
  top: BlockBackend,
  filename: string,
  backing: string,
  source: ImageSpec,
  progress: ImgProgress,
): Promise<void> {
  const layers = layersOf(graph, 'layer0');
  const reader = (node: string) =>
    graph.createBackend(node, {
      name: node,
      maxExtents: 65536,
      perm: ['consistent-read'],
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
  const oldBacking = layers.length > 1 ? await reader(layers[1]!.nodeName) : undefined;
  // The new backing file in the old chain (layer `prefix`), or opened on its own.
  let prefix = -1;
  let newBacking: BlockBackend | undefined;
  if (backing !== '') {
    const path = isAbsolute(backing) ? backing : join(dirname(filename), backing);
    prefix = await findBackingImage(layers, path);
    if (prefix > 0) newBacking = await reader(layers[prefix]!.nodeName);
    else {
      try {
        await graph.add({
          ...(await nodeOptions({ ...source, name: path })),
          'node-name': 'new-backing',
          'read-only': true,
          ...(source.forceShare && { 'force-share': true }),
        });
        newBacking = await reader('new-backing');
      } catch (e) {
        throw new ImageCommandError(
          `Could not open new backing file '${backing}': ${(couldNotOpen(path, e) as Error).message}`,
          { cause: e },
        );
      }
    }
  }
  const size = top.size();
  const oldSize = oldBacking?.size() ?? 0;
  const newSize = newBacking?.size() ?? 0;
  const step = size !== 0 ? f(100 / Math.floor(size / Math.min(size, IO_BUF_SIZE))) : 0;
  const bufOld = new Uint8Array(IO_BUF_SIZE);
  const bufNew = new Uint8Array(IO_BUF_SIZE);
  for (let offset = 0, n = 0; offset < size; offset += n) {
    n = Math.min(IO_BUF_SIZE, size - offset);
    // Allocated in the image itself (depth 1): it reads the same over any backing file.
    const ext = await top.blockStatus(offset, n, { wantZero: false });
    const own = (ext[0]!.depth ?? 1) === 1;
    n = runOf(ext, n, (d) => (d === 1) === own);
    if (own) continue;
    if (prefix > 0) {
      // Unchanged since the new backing file: nothing above it in the old chain has data.
      const above = (d: number) => d >= 2 && d <= prefix;
      const changed = above(ext[0]!.depth ?? 0);
      n = runOf(ext, n, (d) => above(d) === changed);
      if (!changed) continue;
    }
    const oldZero = offset >= oldSize;
    if (oldZero) bufOld.fill(0, 0, n);
    else {
      n = Math.min(n, oldSize - offset);
      await readOrFail(oldBacking!, offset, bufOld.subarray(0, n), 'old');
    }
    if (!newBacking || offset >= newSize) bufNew.fill(0, 0, n);
    else {
      n = Math.min(n, newSize - offset);
      await readOrFail(newBacking, offset, bufNew.subarray(0, n), 'new');
    }
    for (let done = 0; done < n; ) {
      const [differ, len] = compareBuffers(bufOld, bufNew, done, n);
      if (differ) {
        try {
          if (oldZero) await top.writeZeroes(offset + done, len);
          else await top.write(offset + done, bufOld.subarray(done, done + len));
        } catch (e) {
          throw new ImageCommandError(`Error while writing to COW image: ${(e as Error).message}`, {
            cause: e,
          });
        }
      }
      done += len;
    }
    progress.add(step);
  }
}

/** The length of the run of `ext` (within `n`) whose depths all satisfy `same`. */
function runOf(
  ext: readonly { length: number; depth?: number }[],
  n: number,
  same: (depth: number) => boolean,
): number {
  let len = 0;
  for (const e of ext) {
    if (!same(e.depth ?? 1)) break;
    len += e.length;
  }
  return Math.min(n, Math.max(len, 1));
}

async function readOrFail(b: BlockBackend, offset: number, buf: Uint8Array, which: string) {
  try {
    await b.read(offset, buf);
  } catch (e) {
    throw new ImageCommandError(`error while reading from ${which} backing file`, { cause: e });
  }
}

/**
 * qemu-img's compare_buffers from `from` to `to`: whether the first sector differs, and
 * the length of the run of sectors that do (or do not) as it does.
 */
function compareBuffers(a: Uint8Array, b: Uint8Array, from: number, to: number): [boolean, number] {
  const x = Buffer.from(a.buffer, a.byteOffset, a.length);
  const y = Buffer.from(b.buffer, b.byteOffset, b.length);
  const differs = (at: number) => {
    const end = Math.min(to, at + SECTOR);
    return !x.subarray(at, end).equals(y.subarray(at, end));
  };
  const first = differs(from);
  let i = from + Math.min(to - from, SECTOR);
  while (i < to && differs(i) === first) i += SECTOR;
  return [first, Math.min(i, to) - from];
}
