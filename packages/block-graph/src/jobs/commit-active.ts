// block-commit with top = the active layer (QEMU's block/mirror.c commit_active_start): a
// mirror from the active layer into base, of job type "commit". Only what is allocated
// in the layers above base starts dirty; the mirror_top filter above top catches guest
// writes meanwhile. The job is ready when base has caught up; block-job-complete then
// moves every user of top (exports included) onto base, and the committed layers go
// unless someone else holds them (a node added by blockdev-add stays, as in QEMU). A
// cancel after ready leaves top in use and base a consistent copy of it.
import type { JobRegistry } from '@vmdisk/ao';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import type { BlockJob, BlockJobCommonOptions } from './block-job.ts';
import { layersAbove, mirrorStart } from './mirror.ts';
import { checkNotBusy } from './op-blockers.ts';

export interface CommitActiveOptions extends BlockJobCommonOptions {
  device: string;
  /** The name of the implicit mirror_top filter (QMP filter-node-name). */
  filterNodeName?: string;
  /** Refused: the active layer has no overlay whose header would name base. */
  backingFile?: string;
}

/** The active commit of `top` (the active layer of `device`) into `base`. */
export async function commitActive(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: CommitActiveOptions,
  top: BlockNode,
  base: BlockNode,
): Promise<BlockJob> {
  if (o.backingFile !== undefined) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      "'backing-file' specified, but 'top' is the active layer",
    );
  }
  const committed = layersAbove(top, base);
  // The layers between top and base go at the pivot: no other job may use them.
  const intermediate = committed.slice(1);
  for (const n of intermediate) checkNotBusy(graph, n.name);
  const onError = o.onError ?? 'report';
  // QEMU reopens a read-only base read-write first (commit_active_start) and leaves it so
  // after the job (it takes top's place), unless the job could not start.
  const reopened = await makeWritable(graph, base);
  try {
    return await mirrorStart(
      graph,
      jobs,
      top,
      base,
      {
        ...o,
        sync: 'full',
        onSourceError: onError,
        onTargetError: onError,
      },
      {
        type: 'commit',
        zeroTarget: false,
        // bdrv_is_allocated_above(top, base_overlay): data of the layers above base.
        depth: committed.length,
        growTarget: true,
        hold: async (bj) => {
          // QEMU's "intermediate node" blockers: no permission taken, reads and writes shared.
          for (const n of intermediate) {
            await bj.addNode(n.name, [], ['consistent-read', 'write-unchanged', 'write']);
          }
          const links: [string, string][] = [];
          for (let i = 0; i < committed.length; i++) {
            links.push([committed[i]!.name, (committed[i + 1] ?? base).name]);
          }
          bj.freeze(links);
        },
      },
    );
  } catch (err) {
    if (reopened) await graph.reopen(base.name, { 'read-only': true }).catch(() => {});
    throw err;
  }
}

/**
 * Reopens a read-only base read-write for a commit (bdrv_reopen_set_read_only); true when
 * it did (the caller puts it back).
 */
export async function makeWritable(graph: BlockGraph, base: BlockNode): Promise<boolean> {
  if (!base.readOnly) return false;
  await graph.reopen(base.name, { 'read-only': false });
  return true;
}
