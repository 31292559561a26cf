// block-commit (QEMU's block/commit.c), the intermediate case: the data of `top` and the
// layers between it and `base` is copied into base, then top's overlay gets base as its
// backing and the committed layers go. Active commit (top is the active layer) is a
// mirror into base: commit-active.ts.
import type { JobRegistry } from '@vmdisk/ao';
import type { BlockDriver } from '../driver.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { BLK_PERM_ALL } from '../permissions.ts';
import { BlockJob, type BlockJobCommonOptions } from './block-job.ts';
import { chainOf, findBase, layerFilename } from './chain.ts';
import { commitActive, makeWritable } from './commit-active.ts';
import { copyChunks } from './copy-loop.ts';
import { rootNode } from './mirror.ts';
import { MirrorTopInstance } from './mirror-top.ts';
import { checkNotBusy } from './op-blockers.ts';
import { lookupNode, resizeNode } from './resize.ts';

/**
 * QEMU's commit_top (bdrv_commit_top): passes everything through to top; read-only, it
 * takes nothing of top and shares everything (bdrv_commit_top_child_perm).
 */
const commitTopDriver: BlockDriver = {
  name: 'commit_top',
  options: {},
  children: [{ key: 'backing', required: true, roles: () => ['filtered', 'primary'] }],
  childPerms: () => ({ perm: 0, shared: BLK_PERM_ALL }),
  async open(ctx) {
    return new MirrorTopInstance(ctx.children.backing!);
  },
};

/** QEMU's COMMIT_BUFFER_SIZE. */
const CHUNK = 512 * 1024;

export interface BlockCommitOptions extends BlockJobCommonOptions {
  device: string;
  top?: string;
  topNode?: string;
  base?: string;
  baseNode?: string;
  /** The name written into the overlay's header for base (default: base's file name). */
  backingFile?: string;
  /** The name of the job's filter above top (active commit: mirror_top; else commit_top). */
  filterNodeName?: string;
}

const ALL = ['consistent-read', 'write', 'write-unchanged', 'resize'] as const;

export async function blockCommit(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: BlockCommitOptions,
): Promise<BlockJob> {
  const active = rootNode(graph, o.device);
  const chain = chainOf(active);
  let top: BlockNode = active;
  if (o.top !== undefined && o.topNode !== undefined) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      "'top' and 'top-node' cannot be specified at the same time",
    );
  }
  if (o.topNode !== undefined) {
    top = lookupNode(graph, undefined, o.topNode) as BlockNode;
    if (!chain.includes(top)) {
      throw new BlockError(
        BlockErrorCode.BAD_JOB,
        `'${o.topNode}' is not in this backing file chain`,
      );
    }
  } else if (o.top !== undefined) {
    const found = chain.slice(1).find((n) => layerFilename(n) === o.top);
    if (!found && layerFilename(active) !== o.top) {
      throw new BlockError(BlockErrorCode.BAD_JOB, `Top image file ${o.top} not found`);
    }
    top = (found as BlockNode | undefined) ?? active;
  }
  const topChain = chainOf(top);
  if (o.baseNode === top.name) {
    throw new BlockError(BlockErrorCode.BAD_JOB, 'cannot commit an image into itself');
  }
  const base =
    findBase(graph, top, o.base, o.baseNode) ??
    (topChain.length > 1 ? topChain[topChain.length - 1] : undefined);
  if (!base || base === top) {
    throw new BlockError(BlockErrorCode.BAD_JOB, 'cannot commit an image into itself');
  }
  if (top === active) return commitActive(graph, jobs, o, top, base as BlockNode);
  const overlay = chain[chain.indexOf(top) - 1]! as BlockNode;
  const baseAt = topChain.indexOf(base); // layers of top's chain above base
  const committed = topChain.slice(0, baseAt) as BlockNode[];
  for (const n of [overlay, ...committed, base]) checkNotBusy(graph, n.name);
  let filter: BlockNode | undefined;
  const dropFilter = async (): Promise<void> => {
    const f = filter;
    filter = undefined;
    if (f) await graph.removeFilter(f.name, top.name);
  };
  return BlockJob.start(
    graph,
    jobs,
    'commit',
    o,
    async (bj) => {
      // QEMU reopens a read-only base read-write for the job and back afterwards
      // (commit_start, commit_clean).
      if (await makeWritable(graph, base as BlockNode)) {
        bj.onRelease(() => graph.reopen(base.name, { 'read-only': true }));
      }
      await bj.addNode(
        base.name,
        ['consistent-read', 'write', 'resize'],
        ['consistent-read', 'write-unchanged'],
        true,
      );
      // QEMU 7.2 puts a read-only commit_top filter above top for the job's life, named by
      // filter-node-name or implicit (an automatic name, shown by query-named-block-nodes).
      filter = await graph.insertFilter(commitTopDriver, top.name, o.filterNodeName, undefined, {
        readOnly: true,
      });
      try {
        // QEMU reads top through a BlockBackend (s->top); the layers below it are job children.
        for (const n of committed) await bj.addNode(n.name, ['consistent-read'], ALL, n === top);
        await bj.addNode(overlay.name, [], ALL); // "overlay of top": its backing link changes
      } catch (err) {
        await dropFilter();
        throw err;
      }
      const links: [string, string][] = filter
        ? [
            [overlay.name, filter.name],
            [filter.name, top.name],
          ]
        : [[overlay.name, top.name]];
      for (let i = 0; i < baseAt; i++) links.push([topChain[i]!.name, topChain[i + 1]!.name]);
      bj.freeze(links);
    },
    {
      run: (bj) => run(bj, top, base as BlockNode, baseAt),
      abort: dropFilter,
      prepare: async (bj) => {
        bj.unfreeze();
        await dropFilter();
        const filename = o.backingFile ?? layerFilename(base) ?? base.name;
        await graph.setBacking(overlay.name, base.name, async () => {
          const inst = overlay.instance;
          if (inst.kind === 'format' && inst.changeBackingFile) {
            await inst.changeBackingFile(filename, base.driver);
          }
        });
      },
    },
  );
}

async function run(bj: BlockJob, top: BlockNode, base: BlockNode, baseAt: number): Promise<void> {
  // A base smaller than top grows to top's size first (commit_run's blk_truncate).
  const len = top.size();
  if (base.size() < len) await bj.graph.lock.write(() => resizeNode(base, len));
  return copyChunks(bj, top.size(), CHUNK, async (offset, want, c) => {
    const s = await top.blockStatus(offset, want, false);
    c.n = s.length;
    // Allocated in top or a layer between it and base (depth 1 .. baseAt).
    if (s.depth < 1 || s.depth > baseAt) return;
    const buf = top.allocBuffer(c.n);
    try {
      const data = buf.subarray(0, c.n);
      await top.read(offset, data);
      c.reading = false;
      await base.write(offset, data);
      c.copied = c.n;
    } finally {
      top.releaseBuffer(buf);
    }
  });
}
