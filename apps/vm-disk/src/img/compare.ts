// `vm-disk compare`, as `qemu-img compare`: whether two images read the same, walking
// both block statuses (ranges zero in both are not read) and reading 2 MiB at a time.
// Exit status as qemu-img's: 0 identical, 1 different (the first differing 512-byte
// sector named), 2 an image could not be opened, 3 block status failed, 4 a read failed;
// usage errors 1. -s (strict): a difference in allocation or size is a difference too.
import type { BlockBackend, Extent } from '@vmdisk/block-graph';
import { UsageError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { imgArgs } from './args.ts';
import { ExtentCursor } from './extents.ts';
import { checkCacheMode, imageGraph, openImage } from './open.ts';
import { ImgProgress } from './progress.ts';

const IO_BUF_SIZE = 2 << 20;
const SECTOR = 512;

/** QEMU's block status bits as compare -s compares them (ALLOCATED, DATA, ZERO). */
const statusBits = (e: Extent): number =>
  (e.depth !== 0 ? 1 : 0) | (e.hole ? 0 : 2) | (e.zero ? 4 : 0);
const allocated = (e: Extent): boolean => e.depth !== 0;

/** The first differing sector of two buffers (qemu-img's compare_buffers), or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const x = Buffer.from(a.buffer, a.byteOffset, a.length);
  const y = Buffer.from(b.buffer, b.byteOffset, b.length);
  if (x.equals(y)) return -1;
  for (let i = 0; i < a.length; i += SECTOR) {
    const n = Math.min(SECTOR, a.length - i);
    if (!x.subarray(i, i + n).equals(y.subarray(i, i + n))) return i;
  }
  return -1;
}

/** The first sector of buf that is not all zeros, or -1. */
function firstNonZero(buf: Uint8Array): number {
  const zero = Buffer.alloc(SECTOR);
  const x = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  for (let i = 0; i < buf.length; i += SECTOR) {
    const n = Math.min(SECTOR, buf.length - i);
    if (!x.subarray(i, i + n).equals(zero.subarray(0, n))) return i;
  }
  return -1;
}

/** A failure of the comparison with qemu-img's exit status. */
class CompareFailure extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

async function readOrFail(b: BlockBackend, offset: number, buf: Uint8Array, name: string) {
  try {
    await b.read(offset, buf);
  } catch (e) {
    throw new CompareFailure(
      `Error while reading offset ${offset} of ${name}: ${(e as Error).message}`,
      4,
    );
  }
}

async function statusOrFail(c: ExtentCursor, offset: number, name: string): Promise<Extent> {
  try {
    return await c.current(offset);
  } catch {
    throw new CompareFailure(`Sector allocation test failed for ${name}`, 3);
  }
}

export async function compare(
  argv: readonly string[],
  out: NodeJS.WritableStream,
  err: NodeJS.WritableStream,
): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    'a-format': { type: 'string', short: 'f' },
    'b-format': { type: 'string', short: 'F' },
    cache: { type: 'string', short: 'T' },
    progress: { type: 'boolean', short: 'p', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
    strict: { type: 'boolean', short: 's', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length !== 2) throw new UsageError('Expecting two image file names');
  checkCacheMode(values.cache);
  const [name1, name2] = positionals as [string, string];
  const say = (line: string) => {
    if (!values.quiet) out.write(`${line}\n`);
  };
  const progress = new ImgProgress(
    out,
    values.progress && !values.quiet,
    createLogger(),
    'compare',
    2,
  );
  let graph: Awaited<ReturnType<typeof imageGraph>> | undefined;
  try {
    let blk1: BlockBackend;
    let blk2: BlockBackend;
    try {
      graph = await imageGraph(values.object);
      const common = {
        readOnly: true,
        forceShare: values['force-share'],
        imageOpts: values['image-opts'],
        cache: values.cache,
      };
      blk1 = await openImage(graph, { ...common, name: name1, format: values['a-format'] }, 'a');
      blk2 = await openImage(graph, { ...common, name: name2, format: values['b-format'] }, 'b');
      progress.start();
    } catch (e) {
      err.write(`vm-disk: ${(e as Error).message}\n`);
      return 2;
    }
    return await compareOpen(blk1, blk2, name1, name2, values.strict, say, progress);
  } catch (e) {
    if (!(e instanceof CompareFailure)) throw e;
    err.write(`vm-disk: ${e.message}\n`);
    return e.status;
  } finally {
    progress.end();
    await graph?.close();
  }
}

async function compareOpen(
  blk1: BlockBackend,
  blk2: BlockBackend,
  name1: string,
  name2: string,
  strict: boolean,
  say: (line: string) => void,
  progress: ImgProgress,
): Promise<number> {
  const size1 = blk1.size();
  const size2 = blk2.size();
  const total = Math.min(size1, size2);
  const base = Math.max(size1, size2);
  if (strict && size1 !== size2) {
    say('Strict mode: Image size mismatch!');
    return 1;
  }
  const c1 = new ExtentCursor(blk1, size1);
  const c2 = new ExtentCursor(blk2, size2);
  const buf1 = blk1.allocBuffer(IO_BUF_SIZE);
  const buf2 = blk2.allocBuffer(IO_BUF_SIZE);
  /** qemu-img's check_empty_sectors: 0, or 1 with the mismatch said. */
  const checkEmpty = async (b: BlockBackend, offset: number, n: number, name: string) => {
    await readOrFail(b, offset, buf1.subarray(0, n), name);
    const at = firstNonZero(buf1.subarray(0, n));
    if (at < 0) return 0;
    say(`Content mismatch at offset ${offset + at}!`);
    return 1;
  };
  try {
    let offset = 0;
    while (offset < total) {
      const s1 = await statusOrFail(c1, offset, name1);
      const s2 = await statusOrFail(c2, offset, name2);
      let chunk = Math.min(s1.length, s2.length, total - offset);
      if (strict && statusBits(s1) !== statusBits(s2)) {
        say(`Strict mode: Offset ${offset} block status mismatch!`);
        return 1;
      }
      if (s1.zero && s2.zero) {
        // Both read as zeros.
      } else if (allocated(s1) === allocated(s2)) {
        if (allocated(s1)) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          await Promise.all([
            readOrFail(blk1, offset, buf1.subarray(0, chunk), name1),
            readOrFail(blk2, offset, buf2.subarray(0, chunk), name2),
          ]);
          const at = firstDifference(buf1.subarray(0, chunk), buf2.subarray(0, chunk));
          if (at >= 0) {
            say(`Content mismatch at offset ${offset + at}!`);
            return 1;
          }
        }
      } else {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const r = allocated(s1)
          ? await checkEmpty(blk1, offset, chunk, name1)
          : await checkEmpty(blk2, offset, chunk, name2);
        if (r) return r;
      }
      offset += chunk;
      progress.advance(chunk, base);
    }
    if (size1 !== size2) {
      say('Warning: Image size mismatch!');
      const [over, cursor, name] = size1 > size2 ? [blk1, c1, name1] : [blk2, c2, name2];
      while (offset < base) {
        const s = await statusOrFail(cursor, offset, name);
        let chunk = Math.min(s.length, base - offset);
        if (allocated(s) && !s.zero) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          const r = await checkEmpty(over, offset, chunk, name);
          if (r) return r;
        }
        offset += chunk;
        progress.advance(chunk, base);
      }
    }
    say('Images are identical.');
    return 0;
  } finally {
    blk1.releaseBuffer(buf1);
    blk2.releaseBuffer(buf2);
  }
}
