// block-stream (QEMU's block/stream.c): copies into `top` what it reads from the layers
// between it and `base` (the whole chain without base), then makes base its backing (or
// none) and drops the streamed layers; a chain below base stays as it is, shared.
//
// Each chunk not allocated in top but above base is copied under a serialising hold on
// top's range (as copy-on-read does): a guest write to the range waits, and one that came
// first is seen by the allocation check, so that the job never overwrites newer data.
// As QEMU 7.2, a copy-on-read filter sits above top for the job's life (named by
// filter-node-name, else implicit), its `bottom` the lowest streamed layer, so that guest
// reads through it copy up too; the job itself writes top directly.
import type { JobRegistry } from '@vmdisk/ao';
import type { ChildNode } from '../driver.ts';
import { copyOnReadDriver } from '../drivers/copy-on-read.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { BlockJob, type BlockJobCommonOptions } from './block-job.ts';
import { chainOf, findBase, layerFilename } from './chain.ts';
import { copyChunks } from './copy-loop.ts';
import { checkNotBusy } from './op-blockers.ts';
import { lookupNode } from './resize.ts';

/** QEMU's STREAM_CHUNK. */
const CHUNK = 512 * 1024;

export interface BlockStreamOptions extends BlockJobCommonOptions {
  device: string;
  base?: string;
  baseNode?: string;
  /** The name written into top's header for base (default: base's file name). */
  backingFile?: string;
  /** The lowest layer streamed (instead of base: the one above it). */
  bottom?: string;
  /** The name of the copy-on-read filter above top (default: an implicit one). */
  filterNodeName?: string;
}

const ALL = ['consistent-read', 'write', 'write-unchanged', 'resize'] as const;
const READ_UNCHANGED = ['consistent-read', 'write-unchanged'] as const;

export async function blockStream(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: BlockStreamOptions,
): Promise<BlockJob> {
  const top = lookupNode(graph, o.device, o.device) as BlockNode;
  const chain = chainOf(top);
  const bottom = findBottom(graph, top, chain, o);
  const base = bottom ? chain[chain.indexOf(bottom) + 1] : findBase(graph, top, o.base, o.baseNode);
  if (o.backingFile !== undefined && (bottom || !base)) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      'backing file specified, but streaming the entire chain',
    );
  }
  const baseAt = base ? chain.indexOf(base) : chain.length;
  const streamed = chain.slice(1, baseAt);
  for (const n of [top, ...streamed]) checkNotBusy(graph, n.name);
  let filter: BlockNode | undefined;
  const dropFilter = async (): Promise<void> => {
    const f = filter;
    filter = undefined;
    if (f) await graph.removeFilter(f.name, top.name);
  };
  return BlockJob.start(
    graph,
    jobs,
    'stream',
    o,
    async (bj) => {
      await bj.addNode(top.name, ['consistent-read', 'write-unchanged'], ALL);
      for (const n of streamed) await bj.addNode(n.name, [], READ_UNCHANGED);
      filter = await graph.insertFilter(copyOnReadDriver, top.name, o.filterNodeName, undefined, {
        children: { file: top.name },
        options: { bottom: chain[Math.max(0, baseAt - 1)]!.name },
      });
      // Down to base's overlay: the link into base stays free (QEMU's above_base).
      const links: [string, string][] = [];
      for (let i = 0; i + 1 < baseAt; i++) links.push([chain[i]!.name, chain[i + 1]!.name]);
      bj.freeze(links);
    },
    {
      run: (bj) => run(bj, top, baseAt),
      abort: dropFilter,
      prepare: async (bj) => {
        bj.unfreeze();
        await dropFilter();
        const filename = base ? (o.backingFile ?? layerFilename(base) ?? base.name) : null;
        const format = base ? base.driver : null;
        await graph.setBacking(top.name, base ? base.name : null, async () => {
          const inst = top.instance;
          if (inst.kind === 'format' && inst.changeBackingFile) {
            await inst.changeBackingFile(filename, format);
          }
        });
      },
    },
  );
}

/**
 * block-stream's `bottom` (QEMU's qmp_block_stream): exclusive with base and base-node,
 * a node of top's chain.
 */
function findBottom(
  graph: BlockGraph,
  top: ChildNode,
  chain: ChildNode[],
  o: BlockStreamOptions,
): ChildNode | undefined {
  if (o.bottom === undefined) return undefined;
  const fail = (msg: string) => new BlockError(BlockErrorCode.BAD_JOB, msg);
  if (o.base !== undefined && o.baseNode !== undefined) {
    throw fail("'base' and 'base-node' cannot be specified at the same time");
  }
  if (o.base !== undefined) throw fail("'base' and 'bottom' cannot be specified at the same time");
  if (o.baseNode !== undefined) {
    throw fail("'bottom' and 'base-node' cannot be specified at the same time");
  }
  if (!graph.hasNode(o.bottom)) {
    throw new BlockError(
      BlockErrorCode.NODE_NOT_FOUND,
      `Cannot find device='' nor node-name='${o.bottom}'`,
    );
  }
  const found = chain.find((n) => n.name === o.bottom);
  if (!found) throw fail(`Node '${o.bottom}' is not in a chain starting from '${top.name}'`);
  return found;
}

/**
 * Whether [offset, +length) of top must be copied, and for how many bytes the answer
 * holds: allocated in a layer above base (depth 2 .. baseAt) but not in top itself.
 */
async function needsCopy(
  top: ChildNode,
  offset: number,
  length: number,
  baseAt: number,
): Promise<{ copy: boolean; length: number }> {
  const s = await top.blockStatus(offset, length, false);
  return { copy: s.depth >= 2 && s.depth <= baseAt, length: s.length };
}

function run(bj: BlockJob, top: BlockNode, baseAt: number): Promise<void> {
  return copyChunks(bj, top.size(), CHUNK, async (offset, want, c) => {
    const r = await needsCopy(top, offset, want, baseAt);
    c.n = r.length;
    if (!r.copy) return;
    const hold = await top.serialise(offset, offset + c.n);
    const buf = top.allocBuffer(c.n);
    try {
      // Again under the hold: a guest write may have allocated it meanwhile.
      const again = await needsCopy(top, offset, c.n, baseAt);
      c.n = again.length;
      if (!again.copy) return;
      const data = buf.subarray(0, c.n);
      await top.readBelow(offset, data);
      c.reading = false;
      await top.write(offset, data, { owner: hold });
      c.copied = c.n;
    } finally {
      top.releaseBuffer(buf);
      top.release(hold);
    }
  });
}
