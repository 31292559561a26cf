// `vm-disk bench`, as `qemu-img bench`: `count` requests of `size` bytes, `depth` in
// flight, from `offset` on by `step` (wrapping at the end of the disk), reads or (-w)
// writes of the pattern byte, through the block graph on our engine; optionally a flush
// every `flush-interval` requests (after draining unless --no-drain). Prints qemu-img's
// two lines (what it sends, how long the run took).
import { schema } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { imgArgs } from './args.ts';
import { checkCacheMode, imageGraph, nodeOptions } from './open.ts';

const SUFFIXES =
  'You may use k, M, G, T, P or E suffixes for\nvm-disk: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

function count(text: string | undefined, fallback: number, what: string, min = 0): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > 0x7fffffff)
    throw new ImageCommandError(`Invalid ${what} specified`);
  return n;
}

function size(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined) return fallback;
  const n = schema.parseSize(text);
  if (n === undefined) throw new ImageCommandError(`Invalid ${what} specified. ${SUFFIXES}`);
  return n;
}

const AIO = ['threads', 'native', 'io_uring'];

export async function bench(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    count: { type: 'string', short: 'c' },
    depth: { type: 'string', short: 'd' },
    format: { type: 'string', short: 'f' },
    'flush-interval': { type: 'string' },
    aio: { type: 'string', short: 'i' },
    native: { type: 'boolean', short: 'n', default: false },
    'no-drain': { type: 'boolean', default: false },
    offset: { type: 'string', short: 'o' },
    pattern: { type: 'string' },
    quiet: { type: 'boolean', short: 'q', default: false },
    size: { type: 'string', short: 's' },
    step: { type: 'string', short: 'S' },
    cache: { type: 'string', short: 't' },
    write: { type: 'boolean', short: 'w', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  const n = count(values.count, 75000, 'request count');
  const depth = count(values.depth, 64, 'queue depth');
  // (qemu-img takes a depth of 0 and then never finishes: refused here.)
  if (depth === 0 && n > 0) throw new ImageCommandError('Invalid queue depth specified');
  const flushInterval = count(values['flush-interval'], 0, 'flush interval');
  const bufSize = size(values.size, 4096, 'buffer size');
  const offset0 = size(values.offset, 0, 'offset');
  const step = size(values.step, bufSize, 'step_size') || bufSize;
  let pattern = 0;
  if (values.pattern !== undefined) {
    pattern = Number(values.pattern);
    if (!/^(0x[0-9a-f]+|\d+)$/i.test(values.pattern) || pattern > 0xff)
      throw new ImageCommandError('Invalid pattern byte specified');
  }
  let aio = values.aio;
  if (aio !== undefined && !AIO.includes(aio))
    throw new ImageCommandError(`Invalid aio option: ${aio}`);
  if (values.native) aio = 'native';
  if (values.cache !== undefined) {
    try {
      checkCacheMode(values.cache);
    } catch {
      throw new ImageCommandError('Invalid cache mode');
    }
  }
  if (values['flush-interval'] !== undefined && !values.write)
    throw new ImageCommandError('--flush-interval is only available in write tests');
  if (flushInterval > 0 && flushInterval < depth)
    throw new ImageCommandError("Flush interval can't be smaller than depth");
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const filename = positionals[0]!;
  const cache = values.cache ?? 'writeback';
  const direct = cache === 'none' || cache === 'directsync';
  if (aio === 'native' && !direct) {
    throw new ImageCommandError(
      `Could not open '${filename}': aio=native was specified, but it requires cache.direct=on, which was not specified.`,
    );
  }
  const spec = {
    name: filename,
    format: values.format,
    imageOpts: values['image-opts'],
    readOnly: !values.write,
    forceShare: values['force-share'],
    cache,
  };
  const options = await nodeOptions(spec);
  const file = options.file as Record<string, unknown> | undefined;
  if (aio !== undefined && file?.driver === 'file') file.aio = aio;

  const graph = await imageGraph(values.object);
  try {
    await graph.add(
      {
        ...options,
        'node-name': 'image',
        'read-only': spec.readOnly,
        ...(spec.forceShare && { 'force-share': true }),
      },
      { syntax: spec.imageOpts ? 'keyval' : 'json' },
    );
    const backend = await graph.createBackend('image', {
      name: 'bench',
      ...(spec.readOnly
        ? {
            perm: ['consistent-read'],
            shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
          }
        : { write: true }),
    });
    const imageSize = backend.size();
    out.write(
      `Sending ${n} ${values.write ? 'write' : 'read'} requests, ${bufSize} bytes each, ${depth} in parallel (starting at offset ${offset0}, step size ${step})\n`,
    );
    if (flushInterval > 0) {
      out.write(`Sending flush every ${flushInterval} requests\n`);
    }
    // Each worker's buffer, allocated and filled before the clock starts (qemu-img bench
    // allocates and fills its buffers before its first gettimeofday).
    const bufs = Array.from({ length: Math.min(depth, Math.max(n, 1)) }, () =>
      backend.allocBuffer(bufSize).fill(pattern),
    );
    const started = performance.now();
    const done = runRequests({
      n,
      flushInterval,
      drain: !values['no-drain'],
      offset0,
      step,
      bufSize,
      imageSize,
      bufs,
      write: values.write,
      io: {
        read: (o, b) => backend.read(o, b),
        write: (o, b) => backend.write(o, b),
        flush: () => backend.flush(),
      },
    });
    try {
      await done;
    } catch (e) {
      throw new ImageCommandError('Failed request: Input/output error', { cause: e });
    }
    const seconds = (performance.now() - started) / 1000;
    out.write(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
    return 0;
  } finally {
    await graph.close();
  }
}

interface BenchIo {
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, buf: Uint8Array): Promise<void>;
  flush(): Promise<void>;
}

interface Run {
  n: number;
  flushInterval: number;
  drain: boolean;
  offset0: number;
  step: number;
  bufSize: number;
  imageSize: number;
  /** One buffer per worker. */
  bufs: Uint8Array[];
  write: boolean;
  io: BenchIo;
}

/**
 * QEMU's bench loop: one worker per buffer in `bufs`, each takes the next offset and
 * issue a request until `n` were issued. Every `flushInterval` requests a flush: with
 * `drain`, the workers wait for the flush, which waits for what is in flight.
 */
async function runRequests(r: Run): Promise<void> {
  let issued = 0;
  let offset = r.offset0;
  let gate: Promise<void> | null = null;
  const inFlight = new Set<Promise<void>>();
  const next = (): number => {
    const o = offset;
    offset += r.step;
    if (offset + r.bufSize > r.imageSize) offset = 0;
    return o;
  };
  const worker = async (buf: Uint8Array) => {
    while (issued < r.n) {
      if (gate) {
        await gate;
        continue;
      }
      issued++;
      const o = next();
      const p = r.write ? r.io.write(o, buf) : r.io.read(o, buf);
      inFlight.add(p);
      try {
        await p;
      } finally {
        inFlight.delete(p);
      }
      if (r.flushInterval > 0 && issued % r.flushInterval === 0 && issued < r.n) {
        if (r.drain) {
          gate ??= (async () => {
            await Promise.allSettled([...inFlight]);
            await r.io.flush();
            gate = null;
          })();
        } else {
          void r.io.flush();
        }
      }
    }
  };
  await Promise.all(r.bufs.map(worker));
}
