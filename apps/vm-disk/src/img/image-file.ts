// The file of a format image, opened alone (its `file` node), for the subcommands that
// rewrite a qcow2 image's metadata offline (snapshot, amend): the image is first opened as
// qemu-img opens it (its errors, its locks), then its file node with the same sharing.
import type { BlockBackend, BlockGraph } from '@vmdisk/block-graph';
import { ImageCommandError } from '../errors.ts';
import { type ImageSpec, imageGraph, nodeOptions, openImage } from './open.ts';

/** Opens `spec` as qemu-img would and closes it again; returns its node options. */
export async function probeImage(
  spec: ImageSpec,
  objects: readonly string[],
): Promise<Record<string, unknown>> {
  const probe = await imageGraph(objects);
  try {
    await openImage(probe, spec, 'image');
  } finally {
    await probe.close();
  }
  return nodeOptions(spec);
}

/** The `file` node of the image `options` describe, in `graph`, as a qcow2 core file. */
export async function openImageFile(
  graph: BlockGraph,
  spec: ImageSpec,
  options: Record<string, unknown>,
) {
  await graph.add(
    {
      ...(options.file as Record<string, unknown>),
      'node-name': 'file',
      'read-only': spec.readOnly,
      ...(spec.forceShare && { 'force-share': true }),
    },
    { syntax: spec.imageOpts ? 'keyval' : 'json' },
  );
  const backend = await graph.createBackend('file', {
    name: 'image-file',
    perm: spec.readOnly ? ['consistent-read'] : ['consistent-read', 'write', 'resize'],
    shared: spec.forceShare
      ? ['consistent-read', 'write', 'write-unchanged', 'resize']
      : ['consistent-read', 'write-unchanged'],
  });
  return fileOf(backend);
}

/**
 * A backend of an image's file node as the qcow2 core's file (check, snapshot, amend):
 * reads past the end are short, and nothing here truncates it.
 */
export function fileOf(b: BlockBackend) {
  return {
    async read(buf: Uint8Array, offset: number) {
      const n = Math.min(buf.byteLength, b.size() - offset);
      if (n <= 0) return 0;
      await b.read(offset, buf.subarray(0, n));
      return n;
    },
    write: (buf: Uint8Array, offset: number) => b.write(offset, buf),
    size: async () => b.size(),
    truncate: async () => {
      throw new ImageCommandError('the image file is not truncated here');
    },
    flush: () => b.flush(),
  };
}
