// `vm-disk resize`, as `qemu-img resize`: a new virtual size, absolute or relative (+SIZE,
// -SIZE), through block-graph's block_resize on the image opened read-write. Shrinking
// needs --shrink (data past the new end is lost); "Image resized." on success.
import { blockResize, schema } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { imgArgs } from './args.ts';
import { imageGraph, openImage } from './open.ts';

const SIZE_HELP =
  "Parameter 'size' expects a non-negative number below 2^64\n" +
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n' +
  'and exabytes, respectively.';

export async function resize(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  // As qemu-img: the size is the last argument, taken before the options are parsed, so
  // that "-1G" is a size and not an option.
  if (argv.length < 2) throw new UsageError('Not enough arguments');
  const sizeText = argv.at(-1)!;
  const { values, positionals } = imgArgs(argv.slice(0, -1), {
    format: { type: 'string', short: 'f' },
    preallocation: { type: 'string' },
    shrink: { type: 'boolean', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length !== 1) throw new UsageError('Expecting image file name and size');
  const filename = positionals[0]!;
  if (values.preallocation !== undefined && values.preallocation !== 'off')
    throw new ImageCommandError(`Invalid preallocation mode '${values.preallocation}'`);
  const sign = sizeText[0] === '+' ? 1 : sizeText[0] === '-' ? -1 : 0;
  const amount = schema.parseSize(sign ? sizeText.slice(1) : sizeText);
  if (amount === undefined) throw new ImageCommandError(SIZE_HELP);

  const graph = await imageGraph(values.object);
  try {
    const backend = await openImage(
      graph,
      {
        name: filename,
        format: values.format,
        imageOpts: values['image-opts'],
        readOnly: false,
      },
      'image',
    );
    const current = backend.size();
    await backend.close();
    const size = sign ? current + sign * amount : amount;
    if (size <= 0) throw new ImageCommandError('New image size must be positive');
    if (size < current && !values.shrink) {
      throw new ImageCommandError(
        'Use the --shrink option to perform a shrink operation.\n' +
          "vm-disk: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    await blockResize(graph, { nodeName: 'image', size });
    if (!values.quiet) out.write('Image resized.\n');
    return 0;
  } finally {
    await graph.close();
  }
}
