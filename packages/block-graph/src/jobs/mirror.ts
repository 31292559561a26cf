// blockdev-mirror and drive-mirror (QEMU's block/mirror.c mirror_start_job, blockdev.c
// blockdev_mirror_common): a mirror_top filter goes above the source (mirror-top.ts), a
// dirty bitmap on the source records what changed, and the job (mirror-run.ts) copies
// until source and target converge (ready). block-job-complete then pivots: drained, the
// last dirty ranges are copied and every parent of the filter (exports, the guest's
// backend) moves to the target; a cancel after ready leaves the target a consistent copy
// and the source in use. Active commit (commit-active.ts) is a mirror into the base.
import type { JobRegistry } from '@vmdisk/ao';
import type { BdrvDirtyBitmap } from '../dirty-bitmap.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode, ChildEdge } from '../node.ts';
import { type BlockdevOnError, BlockJob, type BlockJobCommonOptions } from './block-job.ts';
import { chainOf } from './chain.ts';
import { MirrorRun } from './mirror-run.ts';
import { type MirrorTopInstance, mirrorTopDriver } from './mirror-top.ts';
import { checkNotBusy } from './op-blockers.ts';
import { lookupNode } from './resize.ts';
import { createImage } from './snapshot.ts';

/** QEMU's DEFAULT_MIRROR_BUF_SIZE (MAX_IN_FLIGHT * MAX_IO_BYTES). */
const DEFAULT_BUF_SIZE = 16 << 20;
const ALL = ['consistent-read', 'write', 'write-unchanged', 'resize'] as const;

export type MirrorSyncMode = 'full' | 'top' | 'none' | 'incremental' | 'bitmap';

export interface MirrorCommonOptions extends BlockJobCommonOptions {
  device: string;
  sync: MirrorSyncMode;
  granularity?: number;
  bufSize?: number;
  onSourceError?: BlockdevOnError;
  onTargetError?: BlockdevOnError;
  filterNodeName?: string;
  copyMode?: 'background' | 'write-blocking';
  /** The node the target takes the place of at completion (default: the source). */
  replaces?: string;
}

export interface BlockdevMirrorOptions extends MirrorCommonOptions {
  /** The target node (an existing one). */
  target: string;
}

export interface DriveMirrorOptions extends MirrorCommonOptions {
  /** The target image's file name. */
  target: string;
  format?: string;
  /** 'absolute-paths' (default): create the image; 'existing': open it. */
  mode?: 'existing' | 'absolute-paths';
  /** The node name of the new target node. */
  nodeName?: string;
}

/** What mirrorStart needs beyond the QMP options (active commit sets more). */
interface MirrorSetup {
  type: 'mirror' | 'commit';
  zeroTarget: boolean;
  /** Layers of the source's chain whose data is copied (sync top: 1). */
  depth: number;
  /** After the pivot: the target's new backing (drive-mirror), by node name. */
  targetBacking?: string | null;
  /** Called at the end either way (drive-mirror drops a target it created if not pivoted). */
  done?: (pivoted: boolean) => Promise<void>;
  /** Called after a successful pivot, still inside the job's prepare. */
  afterPivot?: () => Promise<void>;
  /** Grow a smaller target to the source's size first (active commit's base). */
  growTarget?: boolean;
  /** Extra nodes the job holds (active commit: the layers committed). */
  hold?: (bj: BlockJob) => Promise<void>;
}

function checkMirrorOptions(o: MirrorCommonOptions): void {
  const g = o.granularity ?? 0;
  if (g !== 0 && (g < 512 || g > 64 << 20)) {
    throw new BlockError(
      BlockErrorCode.BAD_OPTION,
      "Parameter 'granularity' expects a value in range [512B, 64MB]",
    );
  }
  if ((g & (g - 1)) !== 0) {
    throw new BlockError(BlockErrorCode.BAD_OPTION, "Parameter 'granularity' expects a power of 2");
  }
  if (o.sync === 'incremental' || o.sync === 'bitmap') {
    throw new BlockError(BlockErrorCode.NOT_SUPPORTED, `Sync mode '${o.sync}' not supported`);
  }
  if ((o.bufSize ?? 0) < 0) {
    throw new BlockError(BlockErrorCode.BAD_OPTION, "Invalid parameter 'buf-size'");
  }
}

/**
 * The node `device` names, which must be a root: no node and no block job above it (QEMU
 * qmp_get_root_bs; a job's backend is no root parent there).
 */
export function rootNode(graph: BlockGraph, device: string): BlockNode {
  const node = lookupNode(graph, device, device) as BlockNode;
  // A mirror's job uses its mirror_top (QEMU's job node is the filter).
  if (node.driver === mirrorTopDriver.name) {
    throw new BlockError(BlockErrorCode.BAD_JOB, 'Need a root block node');
  }
  for (const e of node.parents) {
    // A job's own use of a node (child_job in QEMU) is no root parent; its BlockBackends are.
    if (!e.parent.isBackend || e.parent.jobChild) {
      throw new BlockError(BlockErrorCode.BAD_JOB, 'Need a root block node');
    }
  }
  return node;
}

/** Whether `node` is `below` or reaches it through filters (QEMU bdrv_recurse_can_replace). */
function canReplace(node: BlockNode, below: BlockNode): boolean {
  for (let n: BlockNode | undefined = node; n; ) {
    if (n === below) return true;
    const p: ChildEdge | undefined = n.primary;
    n = p?.roles.includes('filtered') ? p.node : undefined;
  }
  return false;
}

/** The node `replaces` names, checked as QEMU's check_to_replace_node. */
function checkReplaces(graph: BlockGraph, source: BlockNode, replaces: string): BlockNode {
  if (!graph.hasNode(replaces)) {
    throw new BlockError(
      BlockErrorCode.NODE_NOT_FOUND,
      `Failed to find node with node-name='${replaces}'`,
    );
  }
  const node = graph.node(replaces) as BlockNode;
  checkNotBusy(graph, node.name);
  if (!canReplace(source, node)) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      `Cannot replace '${replaces}' by a node mirrored from '${source.name}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data`,
    );
  }
  if (node.size() !== source.size()) {
    throw new BlockError(
      BlockErrorCode.BAD_JOB,
      'cannot replace image with a mirror image of different size',
    );
  }
  return node;
}

/** blockdev-mirror: to an existing node. */
export async function blockdevMirror(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: BlockdevMirrorOptions,
): Promise<BlockJob> {
  const source = rootNode(graph, o.device);
  const target = lookupNode(graph, o.target, o.target) as BlockNode;
  checkMirrorOptions(o);
  if (o.replaces !== undefined) checkReplaces(graph, source, o.replaces);
  return mirrorStart(graph, jobs, source, target, o, {
    type: 'mirror',
    zeroTarget: o.sync === 'full',
    depth: o.sync === 'top' ? 1 : Number.MAX_SAFE_INTEGER,
  });
}

/** drive-mirror: to an image file, created (absolute-paths) or opened (existing). */
export async function driveMirror(
  graph: BlockGraph,
  jobs: JobRegistry,
  o: DriveMirrorOptions,
): Promise<BlockJob> {
  const source = rootNode(graph, o.device);
  checkMirrorOptions(o);
  const format = o.format ?? source.driver;
  if (format !== 'qcow2' && format !== 'raw') {
    throw new BlockError(
      BlockErrorCode.NOT_SUPPORTED,
      `drive-mirror does not support format '${format}' (qcow2, raw)`,
    );
  }
  if (o.nodeName !== undefined && graph.hasNode(o.nodeName)) {
    throw new BlockError(BlockErrorCode.BAD_JOB, `Node name '${o.nodeName}' already in use`);
  }
  checkNotBusy(graph, source.name);
  const mode = o.mode ?? 'absolute-paths';
  const below = source.backing?.node as BlockNode | undefined;
  // The target's backing after the pivot: none (full), the source's (top), the source (none).
  const backing = o.sync === 'full' ? null : o.sync === 'top' ? (below ?? null) : source;
  if (mode === 'absolute-paths') {
    await createImage(graph, o.target, format, source.size(), backing);
  }
  const target = (await graph.add({
    driver: format,
    ...(o.nodeName !== undefined && { 'node-name': o.nodeName }),
    file: { driver: 'file', filename: o.target },
    ...(format === 'qcow2' && { backing: null }),
  })) as BlockNode;
  let pivoted = false;
  try {
    const bj = await mirrorStart(graph, jobs, source, target, o, {
      type: 'mirror',
      // A new image reads as zeros already.
      zeroTarget: o.sync === 'full' && mode === 'existing',
      depth: o.sync === 'top' ? 1 : Number.MAX_SAFE_INTEGER,
      targetBacking: backing ? backing.name : null,
      done: async (p) => {
        pivoted = p;
      },
    });
    // A target not pivoted to goes once the job has let go of it.
    const drop = async (): Promise<void> => {
      if (!pivoted) await graph.del(target.name).catch(() => {});
    };
    void bj.job.wait().then(drop, drop);
    return bj;
  } catch (err) {
    await graph.del(target.name);
    throw err;
  }
}

/** The mirror job from `source` to `target` (mirror_start_job). */
export async function mirrorStart(
  graph: BlockGraph,
  jobs: JobRegistry,
  source: BlockNode,
  target: BlockNode,
  o: MirrorCommonOptions,
  how: MirrorSetup,
): Promise<BlockJob> {
  if (source === target) {
    throw new BlockError(BlockErrorCode.BAD_JOB, "Can't mirror node into itself");
  }
  checkNotBusy(graph, source.name);
  checkNotBusy(graph, target.name);
  const granularity = o.granularity || target.defaultBitmapGranularity();
  const bufSize = Math.max(
    granularity,
    Math.ceil((o.bufSize || DEFAULT_BUF_SIZE) / granularity) * granularity,
  );
  let filter: BlockNode | undefined;
  let bitmap: BdrvDirtyBitmap | undefined;
  let run: MirrorRun | undefined;
  let pivoted = false;
  const dropFilter = async (
    to: BlockNode,
    before?: () => Promise<void>,
    replace?: { from: string; to: string },
  ): Promise<void> => {
    const f = filter;
    if (!f) return;
    await graph.removeFilter(f.name, to.name, before, replace);
    filter = undefined;
    if (bitmap) source.releaseDirtyBitmap(bitmap);
  };
  const bj = await BlockJob.start(
    graph,
    jobs,
    how.type,
    o,
    async (bj) => {
      try {
        // Drained with the filter's insertion: no write in flight misses the bitmap.
        filter = await graph.insertFilter(mirrorTopDriver, source.name, o.filterNodeName, () => {
          bitmap = source.createDirtyBitmap(granularity);
          bitmap.busy = true;
        });
        await bj.addNode(source.name, ['consistent-read'], ALL);
        const growing = how.growTarget === true && target.size() < source.size();
        await bj.addNode(target.name, growing ? ['write', 'resize'] : ['write'], ALL);
        await how.hold?.(bj);
      } catch (err) {
        await dropFilter(source);
        throw err;
      }
      run = new MirrorRun(bj, {
        source,
        target,
        bitmap: bitmap!,
        bufSize,
        sync: o.sync === 'top' || o.sync === 'none' ? o.sync : 'full',
        depth: how.depth,
        zeroTarget: how.zeroTarget,
        growTarget: how.growTarget === true,
        writeBlocking: o.copyMode === 'write-blocking',
        onSourceError: o.onSourceError ?? 'report',
        onTargetError: o.onTargetError ?? 'report',
      });
    },
    {
      run: async () => {
        const inst = filter!.instance as MirrorTopInstance;
        if (run!.o.writeBlocking) inst.writes = run;
        try {
          await run!.run();
        } finally {
          inst.writes = undefined;
        }
      },
      complete: (bj) => {
        run!.shouldComplete = true;
        bj.job.enter();
      },
      cancel: (_bj, force) => force || !run!.ready,
      prepare: async (bj) => {
        // A cancel after ready: the target stays a consistent copy, the source in use.
        const pivot = !bj.job.cancelRequested;
        // With `replaces` (below the source, through filters) the source stays and that
        // node's users move to the target instead; QEMU checks it can again, and skips
        // the replacement (no error) when it cannot.
        const r =
          o.replaces !== undefined && pivot ? replacedNode(graph, source, o.replaces) : undefined;
        if (r) await dropFilter(source, () => run!.finalCopy(), { from: r.name, to: target.name });
        else await dropFilter(pivot ? target : source, () => run!.finalCopy());
        if (pivot) {
          pivoted = true;
          if (how.targetBacking !== undefined) {
            await graph.setBacking(target.name, how.targetBacking);
          }
          await how.afterPivot?.();
        }
        await how.done?.(pivoted);
      },
      abort: async () => {
        await dropFilter(source);
        await how.done?.(false);
      },
    },
  );
  // With nothing to copy, QEMU's job is ready before the command returns.
  if (o.sync === 'none') await run!.whenReady;
  return bj;
}

/** The node a completing mirror replaces, when it still may (mirror_exit_common). */
function replacedNode(graph: BlockGraph, source: BlockNode, name: string): BlockNode | undefined {
  if (!graph.hasNode(name)) return undefined;
  const node = graph.node(name) as BlockNode;
  return node !== source && canReplace(source, node) ? node : undefined;
}

/** The layers of `top`'s chain above `base` (active commit's committed layers). */
export function layersAbove(top: BlockNode, base: BlockNode): BlockNode[] {
  const chain = chainOf(top) as BlockNode[];
  return chain.slice(0, chain.indexOf(base));
}
