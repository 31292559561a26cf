// `vm-disk dd`, as `qemu-img dd` (7.2): copies bytes [skip*bs, min(count*bs, input size))
// of the input into a new image of that size (-O, raw by default), every byte written as
// it is read, as qemu-img does; a skip past the end makes an empty image.
import { schema } from '@vmdisk/block-graph';
import { BadOptionError, ImageCommandError } from '../errors.ts';
import { imgArgs } from './args.ts';
import { createImage } from './create.ts';
import { imageGraph, openImage } from './open.ts';

const INT_MAX = 2 ** 31 - 1;
/** Bytes read and written at once (whole blocks of bs). */
const BATCH = 1 << 20;

function number(what: string, text: string): number {
  const n = schema.parseSize(text);
  if (n === undefined) throw new ImageCommandError(`Invalid ${what} specified`);
  return n;
}

export async function dd(
  argv: readonly string[],
  _out: NodeJS.WritableStream,
  err: NodeJS.WritableStream,
): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    'target-format': { type: 'string', short: 'O' },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  const ops: Record<string, string> = {};
  for (const operand of positionals) {
    const eq = operand.indexOf('=');
    const key = eq < 0 ? operand : operand.slice(0, eq);
    if (eq < 0 || !['if', 'of', 'bs', 'count', 'skip'].includes(key))
      throw new ImageCommandError(`unrecognized operand ${operand}`);
    ops[key] = operand.slice(eq + 1);
  }
  if (ops.if === undefined || ops.of === undefined)
    throw new ImageCommandError('Must specify both input and output files');
  let bs = 512;
  if (ops.bs !== undefined) {
    bs = schema.parseSize(ops.bs) ?? 0;
    if (bs <= 0 || bs > INT_MAX)
      throw new ImageCommandError('Invalid bs specified. Must be between 1 and 2147483647.');
  }
  const count = ops.count !== undefined ? number('count', ops.count) : undefined;
  const skip = ops.skip !== undefined ? number('skip', ops.skip) : 0;
  const format = values['target-format'] ?? 'raw';
  if (format !== 'raw' && format !== 'qcow2')
    throw new ImageCommandError(`Unknown file format '${format}'`);

  const graph = await imageGraph(values.object);
  try {
    const src = await openImage(
      graph,
      {
        name: ops.if,
        format: values.format,
        imageOpts: values['image-opts'],
        readOnly: true,
        forceShare: values['force-share'],
      },
      'in',
    );
    let size = src.size();
    if (count !== undefined && count * bs < size) size = count * bs;
    const past = size < skip * bs;
    await createImage({
      path: ops.of,
      format,
      options: [],
      size: past ? 0 : size - skip * bs,
    }).catch((e: unknown) => {
      if (e instanceof BadOptionError) throw new ImageCommandError(e.message, { cause: e });
      throw e;
    });
    const dst = await openImage(graph, { name: ops.of, format, readOnly: false }, 'out');
    let inPos = skip * bs;
    if (past) {
      err.write(`vm-disk: ${ops.if}: cannot skip to specified offset\n`);
      inPos = size;
    }
    const batch = Math.max(bs, BATCH - (BATCH % bs));
    const buf = src.allocBuffer(Math.min(batch, Math.max(1, size - inPos)));
    try {
      for (let outPos = 0; inPos < size; ) {
        const n = Math.min(buf.length, size - inPos);
        await src.read(inPos, buf.subarray(0, n));
        await dst.write(outPos, buf.subarray(0, n));
        inPos += n;
        outPos += n;
      }
    } finally {
      src.releaseBuffer(buf);
    }
    await dst.flush();
    return 0;
  } finally {
    await graph.close();
  }
}
