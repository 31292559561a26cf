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
import {
  checkNoOtherKeys,
  keyBool,
  keyEnum,
  keyInt,
  keyString,
  keyUint,
  optionMissing,
} from '../options.ts';
import { BLK_PERM_ALL, permNames } from '../permissions.ts';

export type BlockdevCreateOptions = Record<string, unknown> & { driver: string };

/** A member of BlockdevCreateOptions: QAPI types (size is QEMU's uint64 'size'). */
type Member = { type: 'str' | 'size' | 'int' | 'bool' | readonly string[]; required?: true };
type Spec = Record<string, Member>;

// In QEMU's schema order (qapi/block-core.json), which is the order errors come in.
const FILE_SPEC: Spec = {
  filename: { type: 'str', required: true },
  size: { type: 'size', required: true },
  preallocation: { type: ['off', 'falloc', 'full'] },
  nocow: { type: 'bool' },
};
const QCOW2_SPEC: Spec = {
  file: { type: 'str', required: true },
  'extended-l2': { type: 'bool' },
  size: { type: 'size', required: true },
  version: { type: ['v2', 'v3'] },
  'backing-file': { type: 'str' },
  'backing-fmt': { type: 'str' },
  'cluster-size': { type: 'size' },
  preallocation: { type: ['off', 'metadata', 'full'] },
  'lazy-refcounts': { type: 'bool' },
  'refcount-bits': { type: 'int' },
  'compression-type': { type: ['zlib', 'zstd'] },
};

/** Checks the options as QEMU's QAPI layer does (JSON types), keys named `prefix`KEY. */
function check(options: BlockdevCreateOptions, prefix: string): void {
  const key = (k: string) => `${prefix}${k}`;
  if (options.driver === undefined) throw optionMissing(key('driver'));
  const driver = keyString(options.driver, key('driver'));
  const spec = driver === 'file' ? FILE_SPEC : driver === 'qcow2' ? QCOW2_SPEC : undefined;
  if (!spec) {
    throw new BlockOptionError(
      key('driver'),
      `blockdev-create does not support driver '${driver}' (file, qcow2)`,
    );
  }
  for (const [k, member] of Object.entries(spec)) {
    const value = options[k];
    if (value === undefined) {
      if (member.required) throw optionMissing(key(k));
      continue;
    }
    const { type } = member;
    if (type === 'str') keyString(value, key(k));
    else if (type === 'bool') keyBool(value, key(k), 'json');
    else if (type === 'int') keyInt(value, key(k), 'json');
    else if (type === 'size') keyUint(value, key(k), 'json');
    else keyEnum(value, key(k), type);
  }
  checkNoOtherKeys(options, ['driver', ...Object.keys(spec)], prefix);
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
 * `keyPrefix` goes before the keys errors name (QMP's: 'options.').
 */
export function blockdevCreate(
  graph: BlockGraph,
  jobs: JobRegistry,
  jobId: string,
  options: BlockdevCreateOptions,
  keyPrefix = '',
): Job {
  check(options, keyPrefix);
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
