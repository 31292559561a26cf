// blockdev-create as a job of @vmdisk/ao (QEMU's block/create.c): creates a `file` (a
// host file of a given size) or formats a `qcow2` image on an existing node, with the
// options QEMU's BlockdevCreateOptions give them. The options are checked before the job
// exists, with errors naming the key; the work runs in the job, with progress.
import type { Job, JobRegistry } from '@vmdisk/ao';
import { lockForCreate } from '../drivers/file-lock.ts';
import { createQcow2, type Qcow2CreateOptions } from '../drivers/qcow2/create.ts';
import { qcow2FileOf } from '../drivers/qcow2/qcow2.ts';
import { createRbd, rbdLocationOptions } from '../drivers/rbd.ts';
import type { BlockGraph } from '../graph.ts';
import { BLK_PERM_ALL, permNames } from '../permissions.ts';
import { any, bool, enumOf, type Infer, int, opt, size, str, struct, union } from '../schema.ts';

// In QEMU's schema order (qapi/block-core.json), which is the order errors come in; the
// tag `driver` names the driver (file and qcow2 are the ones vm-disk creates).
export const blockdevCreateOptions = union(
  'driver',
  {},
  {
    file: {
      filename: str,
      size: size,
      preallocation: opt(enumOf(['off', 'falloc', 'full'])),
      nocow: opt(bool),
    },
    qcow2: {
      file: str,
      'extended-l2': opt(bool),
      size: size,
      version: opt(enumOf(['v2', 'v3'])),
      'backing-file': opt(str),
      'backing-fmt': opt(str),
      'cluster-size': opt(size),
      preallocation: opt(enumOf(['off', 'metadata', 'full'])),
      'lazy-refcounts': opt(bool),
      'refcount-bits': opt(int()),
      'compression-type': opt(enumOf(['zlib', 'zstd'])),
    },
    rbd: {
      location: struct(rbdLocationOptions, 'BlockdevOptionsRbd'),
      size: size,
      'cluster-size': opt(size),
      encrypt: opt(any),
    },
  },
);
export type BlockdevCreateOptions = Infer<typeof blockdevCreateOptions>;
type FileCreateOptions = Extract<BlockdevCreateOptions, { driver: 'file' }>;
type Qcow2BlockdevCreateOptions = Extract<BlockdevCreateOptions, { driver: 'qcow2' }>;

function qcow2Options(o: Qcow2BlockdevCreateOptions): Qcow2CreateOptions {
  const out: Qcow2CreateOptions = { size: o.size };
  if (o.version !== undefined) out.compat = o.version === 'v2' ? '0.10' : '1.1';
  if (o['cluster-size'] !== undefined) out.clusterSize = o['cluster-size'];
  if (o['backing-file'] !== undefined) out.backingFile = o['backing-file'];
  if (o['backing-fmt'] !== undefined) out.backingFormat = o['backing-fmt'];
  if (o['lazy-refcounts'] !== undefined) out.lazyRefcounts = o['lazy-refcounts'];
  if (o['extended-l2'] !== undefined) out.extendedL2 = o['extended-l2'];
  if (o['refcount-bits'] !== undefined) out.refcountBits = o['refcount-bits'];
  if (o['compression-type'] !== undefined) out.compressionType = o['compression-type'];
  if (o.preallocation !== undefined) out.preallocation = o.preallocation;
  return out;
}

async function createFile(graph: BlockGraph, o: FileCreateOptions, job: Job): Promise<void> {
  const engine = await graph.engine('auto');
  const file = await engine.openFile(o.filename, { create: true });
  const { size } = o;
  try {
    lockForCreate(file);
    await file.truncate(0);
    await file.truncate(size);
    if (o.preallocation === 'falloc' && size > 0) await file.fallocate('allocate', 0, size);
    if (o.preallocation === 'full') {
      const chunk = engine.allocBuffer(1 << 20).fill(0);
      try {
        job.progressSetRemaining(size);
        for (let at = 0; at < size; at += chunk.length) {
          await job.pausePoint();
          if (job.isCancelled) return;
          const n = Math.min(chunk.length, size - at);
          await file.write(chunk.subarray(0, n), at);
          job.progressUpdate(n);
        }
      } finally {
        engine.releaseBuffer(chunk);
      }
    }
    await file.fdatasync();
  } finally {
    await file.close();
  }
}

async function formatQcow2(
  graph: BlockGraph,
  o: Qcow2BlockdevCreateOptions,
  jobId: string,
  job: Job,
): Promise<void> {
  const nodeName = o.file;
  // The job writes the node and may grow it; everyone else may do anything meanwhile, as
  // in QEMU (the node is expected to be unused).
  const backend = await graph.createBackend(nodeName, {
    name: `job:${jobId}`,
    perm: ['consistent-read', 'write', 'resize'],
    shared: permNames(BLK_PERM_ALL),
  });
  try {
    let reported = 0;
    await createQcow2(qcow2FileOf(graph.node(nodeName)), qcow2Options(o), (done, total) => {
      job.progressSetRemaining(total - done);
      job.progressUpdate(done - reported);
      reported = done;
    });
  } finally {
    await backend.close();
  }
}

/**
 * Starts a blockdev-create job `jobId` in `jobs`: auto-finalized, and left 'concluded'
 * until the client dismisses it (job-dismiss), as qemu-storage-daemon runs it. Throws,
 * before any job exists, when the options are bad or name a node that does not exist.
 * `keyPrefix` goes before the keys errors name (QMP's: 'options.').
 */
export function blockdevCreate(
  graph: BlockGraph,
  jobs: JobRegistry,
  jobId: string,
  given: unknown,
  keyPrefix = '',
): Job {
  const options = blockdevCreateOptions.parse(given, keyPrefix.replace(/\.$/, ''), 'json');
  if (options.driver === 'qcow2') graph.node(options.file);
  const job = jobs.createJob({
    id: jobId,
    autoDismiss: false,
    driver: {
      type: 'create',
      async run(job) {
        await job.pausePoint();
        if (job.isCancelled) return;
        if (options.driver === 'file') await createFile(graph, options, job);
        else if (options.driver === 'rbd') {
          if (options.encrypt !== undefined) throw new Error('RBD encryption is not supported');
          await createRbd(
            options.location,
            options.size,
            options['cluster-size'],
            (id, key) => graph.objects.get('secret', id, `location.${key}`).data,
          );
        } else await formatQcow2(graph, options, jobId, job);
      },
    },
  });
  job.start();
  return job;
}
