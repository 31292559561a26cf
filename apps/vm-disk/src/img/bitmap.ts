// `vm-disk bitmap`, as `qemu-img bitmap` (QEMU 7.2's img_bitmap): --add, --remove,
// --clear, --enable, --disable and --merge SOURCE on one persistent bitmap of an image,
// applied in the order given, through the graph's block-dirty-bitmap-* operations. The
// image is opened read-write without its backing file; the bitmaps go back to it when the
// graph closes, also after a failed operation (those before it stay done, as in qemu-img).
import { parseArgs } from 'node:util';
import {
  type BlockGraph,
  blockDirtyBitmapAdd,
  blockDirtyBitmapClear,
  blockDirtyBitmapEnable,
  blockDirtyBitmapMerge,
  blockDirtyBitmapRemove,
  schema,
} from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { imageGraph, openImage } from './open.ts';

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  object: { type: 'string', multiple: true },
  'image-opts': { type: 'boolean' },
  add: { type: 'boolean', multiple: true },
  remove: { type: 'boolean', multiple: true },
  clear: { type: 'boolean', multiple: true },
  enable: { type: 'boolean', multiple: true },
  disable: { type: 'boolean', multiple: true },
  merge: { type: 'string', multiple: true },
  granularity: { type: 'string', short: 'g' },
  'source-file': { type: 'string', short: 'b' },
  'source-format': { type: 'string', short: 'F' },
  format: { type: 'string', short: 'f' },
} as const;

type Op = 'add' | 'remove' | 'clear' | 'enable' | 'disable' | 'merge';
const OPS: readonly string[] = ['add', 'remove', 'clear', 'enable', 'disable', 'merge'];

interface Action {
  op: Op;
  /** --merge's source bitmap. */
  source?: string | undefined;
}

/** The command line, refused with qemu-img bitmap's words (its getopt string is ":b:f:F:g:h"). */
function parse(argv: readonly string[]) {
  try {
    return parseArgs({
      args: [...argv],
      options: OPTIONS,
      allowPositionals: true,
      strict: true,
      tokens: true,
    });
  } catch (e) {
    const err = e as { code?: string; message: string };
    const named = /'(-[^' ]*)/.exec(err.message)?.[1] ?? '';
    if (err.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE')
      throw new UsageError(`missing argument for option '${named}'`, { cause: e });
    throw new UsageError(`unrecognized option '${named}'`, { cause: e });
  }
}

/** qemu-img's cvtnum("granularity", ...): a size with a k..E suffix, 0 .. INT64_MAX. */
function granularityArg(text: string | undefined): number {
  if (text === undefined) return 0;
  const n = schema.parseSize(text);
  if (n === undefined || n > Number.MAX_SAFE_INTEGER) {
    throw new ImageCommandError(
      'Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n' +
        'vm-disk: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  return n;
}

export async function bitmap(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals, tokens } = parse(argv);
  if (values.help) {
    out.write(
      'Usage: vm-disk bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n' +
        '         [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF]\n' +
        '         [--image-opts | -f FMT] FILENAME BITMAP\n',
    );
    return 0;
  }
  const granularity = granularityArg(values.granularity);
  const actions: Action[] = [];
  for (const t of tokens) {
    if (t.kind === 'option' && OPS.includes(t.name))
      actions.push({ op: t.name as Op, source: t.value });
  }
  if (actions.length === 0) {
    throw new ImageCommandError(
      'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge',
    );
  }
  if (granularity !== 0 && !actions.some((a) => a.op === 'add'))
    throw new ImageCommandError('granularity only supported with --add');
  const sourceFile = values['source-file'];
  if (values['source-format'] !== undefined && sourceFile === undefined)
    throw new ImageCommandError('-F only supported with -b');
  if (sourceFile !== undefined && !actions.some((a) => a.op === 'merge'))
    throw new ImageCommandError('Merge bitmap source file only supported with --merge');
  if (positionals.length !== 2) throw new ImageCommandError('Expecting filename and bitmap name');
  const [filename, name] = positionals as [string, string];

  const graph = await imageGraph(values.object ?? []);
  try {
    // The bitmaps only, not the image's contents: no backing file (BDRV_O_NO_BACKING).
    await openImage(
      graph,
      {
        name: filename,
        format: values.format,
        imageOpts: values['image-opts'],
        readOnly: false,
        backing: false,
      },
      'image',
    );
    let source = 'image';
    if (sourceFile !== undefined) {
      source = 'source';
      await openImage(
        graph,
        { name: sourceFile, format: values['source-format'], readOnly: true, backing: false },
        source,
      );
    }
    for (const action of actions) {
      try {
        await apply(graph, action, name, source, granularity);
      } catch (e) {
        throw new ImageCommandError(
          `Operation ${action.op} on bitmap ${name} failed: ${(e as Error).message}`,
          { cause: e },
        );
      }
    }
    return 0;
  } finally {
    await graph.close();
  }
}

async function apply(
  graph: BlockGraph,
  action: Action,
  name: string,
  source: string,
  granularity: number,
): Promise<void> {
  switch (action.op) {
    case 'add':
      // QMP's granularity is a uint32: qemu-img passes the low 32 bits of -g (0: the default).
      blockDirtyBitmapAdd(graph, {
        node: 'image',
        name,
        ...(granularity !== 0 && { granularity: granularity % 2 ** 32 }),
        persistent: true,
        disabled: false,
      });
      return;
    case 'remove':
      return blockDirtyBitmapRemove(graph, 'image', name);
    case 'clear':
      return blockDirtyBitmapClear(graph, 'image', name);
    case 'enable':
    case 'disable':
      return blockDirtyBitmapEnable(graph, 'image', name, action.op === 'enable');
    case 'merge':
      return blockDirtyBitmapMerge(graph, 'image', name, [
        { node: source, name: action.source ?? '' },
      ]);
  }
}
