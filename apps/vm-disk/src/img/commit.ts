// `vm-disk commit`, as `qemu-img commit`: the image's data written into its backing file
// (or, with -b, into a deeper layer) by the block graph's commit job, which for the top
// of a chain is the active commit (a mirror into base, completed once ready). Then the
// committed image is emptied, unless -d or -b (which implies -d, so that the image still
// reads the same through the layers between it and base). "Image committed." at the end.
import { JobRegistry } from '@vmdisk/ao';
import { blockCommit, makeEmpty, schema } from '@vmdisk/block-graph';
import { ImageCommandError, UsageError } from '../errors.ts';
import { createLogger } from '../log.ts';
import { imgArgs } from './args.ts';
import { chainOptions, findBackingImage, type Layer, readChain } from './chain.ts';
import { checkCacheMode, type ImageSpec, imageGraph, nodeOptions } from './open.ts';
import { ImgProgress } from './progress.ts';

export async function commit(argv: readonly string[], out: NodeJS.WritableStream): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    cache: { type: 'string', short: 't' },
    base: { type: 'string', short: 'b' },
    drop: { type: 'boolean', short: 'd', default: false },
    progress: { type: 'boolean', short: 'p', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
    rate: { type: 'string', short: 'r' },
    object: { type: 'string', multiple: true, default: [] },
    'image-opts': { type: 'boolean', default: false },
  });
  let speed = 0;
  if (values.rate !== undefined) {
    const rate = schema.parseSize(values.rate);
    if (rate === undefined) {
      throw new ImageCommandError(
        'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n' +
          'vm-disk: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
      );
    }
    speed = rate;
  }
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const filename = positionals[0]!;
  checkCacheMode(values.cache);
  // -b implies -d: the layers between the image and base stay as they are.
  const drop = values.drop || values.base !== undefined;
  const spec: ImageSpec = {
    name: filename,
    format: values.format,
    imageOpts: values['image-opts'],
    readOnly: false,
    cache: values.cache,
  };
  const progress = new ImgProgress(out, values.progress && !values.quiet, createLogger(), 'commit');

  let layers: Layer[];
  const probe = await imageGraph(values.object);
  try {
    layers = await readChain(probe, spec);
  } finally {
    await probe.close();
  }
  progress.start();
  let base = 1;
  if (values.base !== undefined) {
    base = await findBackingImage(layers, values.base);
    if (base < 0) {
      throw new ImageCommandError(
        `Did not find '${values.base}' in the backing chain of '${filename}'`,
      );
    }
  } else if (layers.length < 2) {
    throw new ImageCommandError('Image does not have a backing file');
  }

  const graph = await imageGraph(values.object);
  try {
    await graph.add(await chainOptions(spec, layers, (i) => i === 0 || i === base, base), {
      syntax: spec.imageOpts ? 'keyval' : 'json',
    });
    const jobs = new JobRegistry();
    const job = (
      await blockCommit(graph, jobs, {
        device: 'layer0',
        jobId: 'commit',
        baseNode: `layer${base}`,
        speed,
      })
    ).job;
    // As qemu-img's run_block_job: complete the job once it is ready, drawing progress.
    const stop = jobs.onStatusChange((e) => {
      if (e.data.status === 'ready') job.complete();
    });
    const drawing = (async () => {
      for await (const p of job.progress()) progress.update(p.done, p.total);
    })();
    try {
      await job.wait();
    } finally {
      stop();
      await drawing.catch(() => {});
    }
    progress.update(1, 1);
  } catch (e) {
    throw new ImageCommandError((e as Error).message, { cause: e });
  } finally {
    await graph.close();
  }

  if (!drop) await emptyImage(spec, values.object);
  progress.end();
  if (!values.quiet) out.write('Image committed.\n');
  return 0;
}

/** Empties the committed image, opened alone (QEMU blk_make_empty; -ENOTSUP is fine). */
async function emptyImage(spec: ImageSpec, objects: readonly string[]): Promise<void> {
  const graph = await imageGraph(objects);
  try {
    const options = await nodeOptions(spec);
    if (options.driver !== 'qcow2') return;
    await graph.add(
      { ...options, 'node-name': 'image', backing: null },
      { syntax: spec.imageOpts ? 'keyval' : 'json' },
    );
    await makeEmpty(graph, 'image');
  } finally {
    await graph.close();
  }
}
