// `vm-disk check`, as `qemu-img check`: a qcow2 image's refcounts against its references
// and its COPIED flags against its refcounts (block-graph's checkQcow2Image), repaired with
// -r leaks|all and then checked again. Output and exit status as qemu-img's: 0 clean,
// 1 the check failed, 2 corruptions, 3 leaks only, 63 a format without checks; the
// problems one per line on stderr.
import { checkQcow2Image, Qcow2CheckFailed, type Qcow2ImageCheck } from '@vmdisk/block-graph';
import { UsageError } from '../errors.ts';
import { imgArgs, outputFormat } from './args.ts';
import { fileOf } from './image-file.ts';
import { checkCacheMode, imageGraph, nodeOptions, openImage } from './open.ts';
import { percent } from './progress.ts';

/** Exit status of a format that has no check (qemu-img's 63). */
const NOT_SUPPORTED = 63;

function human(r: Qcow2ImageCheck): string {
  const lines: string[] = [];
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    lines.push('No errors were found on the image.');
  } else {
    if (r.corruptions) {
      lines.push(
        '',
        `${r.corruptions} errors were found on the image.`,
        'Data may be corrupted, or further writes to the image may corrupt it.',
      );
    }
    if (r.leaks) {
      lines.push(
        '',
        `${r.leaks} leaked clusters were found on the image.`,
        'This means waste of disk space, but no harm to data.',
      );
    }
    if (r.checkErrors)
      lines.push('', `${r.checkErrors} internal errors have occurred during the check.`);
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    lines.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${percent((r.allocatedClusters * 100) / r.totalClusters)}% allocated, ` +
        `${percent((r.fragmentedClusters * 100) / r.allocatedClusters)}% fragmented, ` +
        `${percent((r.compressedClusters * 100) / r.allocatedClusters)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset) lines.push(`Image end offset: ${r.imageEndOffset}`);
  return `${lines.join('\n')}\n`;
}

/**
 * qemu-img's ImageCheck: the counts that are not zero, and the image's name and format (in
 * the order qemu-img prints them).
 */
function json(r: Qcow2ImageCheck, filename: string): string {
  const nz = (key: string, v: number) => (v !== 0 ? { [key]: v } : {});
  const o = {
    ...nz('image-end-offset', r.imageEndOffset),
    ...nz('total-clusters', r.totalClusters),
    ...nz('corruptions', r.corruptions),
    ...nz('corruptions-fixed', r.corruptionsFixed),
    'check-errors': r.checkErrors,
    ...nz('leaks', r.leaks),
    ...nz('leaks-fixed', r.leaksFixed),
    ...nz('allocated-clusters', r.allocatedClusters),
    ...nz('fragmented-clusters', r.fragmentedClusters),
    ...nz('compressed-clusters', r.compressedClusters),
    filename,
    format: 'qcow2',
  };
  return `${JSON.stringify(o, null, 4)}\n`;
}

export async function check(
  argv: readonly string[],
  out: NodeJS.WritableStream,
  err: NodeJS.WritableStream,
): Promise<number> {
  const { values, positionals } = imgArgs(argv, {
    format: { type: 'string', short: 'f' },
    output: { type: 'string' },
    repair: { type: 'string', short: 'r' },
    cache: { type: 'string', short: 'T' },
    quiet: { type: 'boolean', short: 'q', default: false },
    'force-share': { type: 'boolean', short: 'U', default: false },
    'image-opts': { type: 'boolean', default: false },
    object: { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const filename = positionals[0]!;
  const output = outputFormat(values.output);
  checkCacheMode(values.cache);
  const repair = values.repair;
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
    throw new UsageError(`Unknown option for -r (expecting 'leaks' or 'all'): ${repair}`);
  }
  const fix = { leaks: repair !== undefined, errors: repair === 'all' };
  const spec = {
    name: filename,
    format: values.format,
    imageOpts: values['image-opts'],
    readOnly: repair === undefined,
    forceShare: values['force-share'],
    cache: values.cache,
  };
  const options = await nodeOptions(spec);
  // The image is opened as qemu-img opens it (its errors, its locks), read-only.
  const probe = await imageGraph(values.object);
  try {
    await openImage(probe, { ...spec, readOnly: true }, 'image');
  } finally {
    await probe.close();
  }
  if (options.driver !== 'qcow2') {
    err.write('vm-disk: This image format does not support checks\n');
    return NOT_SUPPORTED;
  }
  // The check reads (and repairs) the image's file: its `file` node, alone.
  const graph = await imageGraph(values.object);
  try {
    const fileOptions = options.file as Record<string, unknown>;
    await graph.add(
      {
        ...fileOptions,
        'node-name': 'file',
        'read-only': !fix.leaks,
        ...(spec.forceShare && { 'force-share': true }),
      },
      { syntax: spec.imageOpts ? 'keyval' : 'json' },
    );
    const shared = spec.forceShare
      ? (['consistent-read', 'write', 'write-unchanged', 'resize'] as const)
      : (['consistent-read', 'write-unchanged'] as const);
    const backend = await graph.createBackend('file', {
      name: 'check',
      perm: fix.leaks ? ['consistent-read', 'write', 'resize'] : ['consistent-read'],
      shared,
    });
    const say = (line: string) => err.write(`${line}\n`);
    let result: Qcow2ImageCheck;
    try {
      result = await checkQcow2Image(fileOf(backend), fix, say);
      if (result.leaksFixed || result.corruptionsFixed) {
        if (!values.quiet && output === 'human') {
          out.write(
            'The following inconsistencies were found and repaired:\n\n' +
              `    ${result.leaksFixed} leaked clusters\n` +
              `    ${result.corruptionsFixed} corruptions\n\n` +
              'Double checking the fixed image now...\n',
          );
        }
        const again = await checkQcow2Image(fileOf(backend), {}, say);
        result = {
          ...again,
          leaksFixed: result.leaksFixed,
          corruptionsFixed: result.corruptionsFixed,
        };
      }
    } catch (e) {
      if (!(e instanceof Qcow2CheckFailed)) throw e;
      err.write(`vm-disk: Check failed: ${e.message}\n`);
      return 1;
    }
    if (!values.quiet) out.write(output === 'json' ? json(result, filename) : human(result));
    if (result.checkErrors) {
      err.write('vm-disk: Check failed\n');
      return 1;
    }
    return result.corruptions ? 2 : result.leaks ? 3 : 0;
  } finally {
    await graph.close();
  }
}
