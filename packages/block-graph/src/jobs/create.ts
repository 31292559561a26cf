// blockdev-create as a job of @vmdisk/ao (QEMU's block/create.c): creates a `file` (a
// host file of a given size) or formats a `qcow2` image on an existing node, with the
// options QEMU's BlockdevCreateOptions give them. The options are checked before the job
// exists, with errors naming the key; the work runs in the job, with progress.
import type { Job, JobRegistry } from '@vmdisk/ao';
import { lockForCreate } from '../drivers/file-lock.ts';
import { createQcow2, type Qcow2CreateOptions } from '../drivers/qcow2/create.ts';
import { qcow2FileOf } from '../drivers/qcow2/qcow2.ts';
import { BlockOptionError } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import { BLK_PERM_ALL, permNames } from '../permissions.ts';

export type BlockdevCreateOptions = Record<string, unknown> & { driver: string };

type Spec = Record<string, 'string' | 'int' | 'bool' | readonly string[]>;

const FILE_SPEC: Spec = {
  driver: 'string',
  filename: 'string',
  size: 'int',
  preallocation: ['off', 'falloc', 'full'],
  nocow: 'bool',
};
const QCOW2_SPEC: Spec = {
  driver: 'string',
  file: 'string',
  size: 'int',
  version: ['v2', 'v3'],
  'backing-file': 'string',
  'backing-fmt': 'string',
  'cluster-size': 'int',
  preallocation: ['off', 'metadata', 'full'],
  'lazy-refcounts': 'bool',
  'refcount-bits': 'int',
  'compression-type': ['zlib', 'zstd'],
  'extended-l2': 'bool',
};
const REQUIRED: Record<string, readonly string[]> = {
  file: ['filename', 'size'],
  qcow2: ['file', 'size'],
};

function check(options: BlockdevCreateOptions): void {
  const spec =
    options.driver === 'file' ? FILE_SPEC : options.driver === 'qcow2' ? QCOW2_SPEC : undefined;
  if (!spec)
    throw new BlockOptionError(
      'driver',
      `blockdev-create does not support driver '${options.driver}' (file, qcow2)`,
    );
  for (const [key, value] of Object.entries(options)) {
    const type = spec[key];
    if (type === undefined) throw new BlockOptionError(key, 'is unexpected');
    const ok =
      type === 'string'
        ? typeof value === 'string'
        : type === 'int'
          ? Number.isSafeInteger(value) && (value as number) >= 0
          : type === 'bool'
            ? typeof value === 'boolean'
            : typeof value === 'string' && type.includes(value);
    if (!ok) {
      throw new BlockOptionError(
        key,
        Array.isArray(type)
          ? `expected one of ${type.join(', ')}`
          : `expected ${type === 'int' ? 'a non-negative integer' : `a ${type}`}`,
      );
    }
  }
  for (const key of REQUIRED[options.driver] ?? []) {
    if (options[key] === undefined) throw new BlockOptionError(key, 'is missing');
  }
}

function qcow2Options(o: BlockdevCreateOptions): Qcow2CreateOptions {
  const out: Qcow2CreateOptions = { size: o.size as number };
  if (o.version !== undefined) out.compat = o.version === 'v2' ? '0.10' : '1.1';
  if (o['cluster-size'] !== undefined) out.clusterSize = o['cluster-size'] as number;
  if (o['backing-file'] !== undefined) out.backingFile = o['backing-file'] as string;
  if (o['backing-fmt'] !== undefined) out.backingFormat = o['backing-fmt'] as string;
  if (o['lazy-refcounts'] !== undefined) out.lazyRefcounts = o['lazy-refcounts'] as boolean;
  if (o['extended-l2'] !== undefined) out.extendedL2 = o['extended-l2'] as boolean;
  if (o['refcount-bits'] !== undefined) out.refcountBits = o['refcount-bits'] as number;
  if (o['compression-type'] !== undefined)
    out.compressionType = o['compression-type'] as 'zlib' | 'zstd';
  if (o.preallocation !== undefined)
    out.preallocation = o.preallocation as 'off' | 'metadata' | 'full';
  return out;
}

async function createFile(graph: BlockGraph, o: BlockdevCreateOptions, job: Job): Promise<void> {
  const engine = await graph.engine('auto');
  const file = await engine.openFile(o.filename as string, { create: true });
  const size = o.size as number;
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
  o: BlockdevCreateOptions,
  jobId: string,
  job: Job,
): Promise<void> {
  const nodeName = o.file as string;
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
 */
export function blockdevCreate(
  graph: BlockGraph,
  jobs: JobRegistry,
  jobId: string,
  options: BlockdevCreateOptions,
): Job {
  check(options);
  if (options.driver === 'qcow2') graph.node(options.file as string);
  const job = jobs.createJob({
    id: jobId,
    autoDismiss: false,
    driver: {
      type: 'create',
      async run(job) {
        await job.pausePoint();
        if (job.isCancelled) return;
        if (options.driver === 'file') await createFile(graph, options, job);
        else await formatQcow2(graph, options, jobId, job);
      },
    },
  });
  job.start();
  return job;
}
