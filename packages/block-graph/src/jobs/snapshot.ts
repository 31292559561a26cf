// External snapshots (QEMU's blockdev-snapshot and blockdev-snapshot-sync): an overlay
// gets the node as its backing, then every user of the node (exports, parents) moves onto
// the overlay, drained. blockdev-snapshot-sync first creates the overlay image (qcow2,
// backed by the node's file) and opens it.

import type { ChildNode } from '../driver.ts';
import { lockForCreate } from '../drivers/file-lock.ts';
import { createQcow2 } from '../drivers/qcow2/create.ts';
import { qcow2FileOf } from '../drivers/qcow2/qcow2.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import type { BlockGraph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { layerFilename } from './chain.ts';
import { checkNotBusy } from './op-blockers.ts';
import { lookupNode } from './resize.ts';

/**
 * A snapshot taken, its node still drained (QEMU external_snapshot_prepare drains it, its
 * clean ends that): `end` ends the drained section.
 */
export interface SnapshotTaken {
  node: string;
  overlay: string;
  end(): void;
}

/**
 * The start of QEMU's external_snapshot_prepare: the node looked up, then drained (block
 * jobs over it or above it pause) until `end`, then checked: not busy (a job's node, or a
 * backing node).
 */
async function drainedNode(
  graph: BlockGraph,
  device: string | undefined,
  nodeName: string | undefined,
): Promise<{ node: BlockNode; end: () => void }> {
  const node = lookupNode(graph, device, nodeName) as BlockNode;
  const end = await graph.lock.drainedSection({ nodes: [node.name] });
  try {
    checkNotBusy(graph, node.name);
    for (const e of node.parents) {
      if (e.roles.includes('cow')) {
        throw new BlockError(
          BlockErrorCode.NODE_BUSY,
          `Node '${node.name}' is busy: node is used as backing hd of '${e.parent.name}'`,
        );
      }
    }
  } catch (err) {
    end();
    throw err;
  }
  return { node, end };
}

/** Runs `work` in the node's drained section, which ends if it fails. */
async function inSection<T>(end: () => void, work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (err) {
    end();
    throw err;
  }
}

/** `overlay` (opened without backing) goes on top of `node`: checked, then appended. */
async function appendOverlay(
  graph: BlockGraph,
  node: BlockNode,
  overlayName: string,
): Promise<void> {
  const overlay = lookupNode(graph, overlayName, overlayName) as BlockNode;
  if ([...overlay.parents].some((e) => e.parent.isBackend)) {
    throw new BlockError(BlockErrorCode.NODE_IN_USE, 'The overlay is already in use');
  }
  if (overlay.backing) {
    throw new BlockError(
      BlockErrorCode.BAD_GRAPH_CHANGE,
      'The overlay already has a backing image',
    );
  }
  if (!overlay.isFormat || overlay.driver === 'raw') {
    throw new BlockError(
      BlockErrorCode.BAD_GRAPH_CHANGE,
      'The overlay does not support backing images',
    );
  }
  await graph.setBacking(overlay.name, node.name);
  try {
    await graph.replaceNode(node.name, overlay.name);
  } catch (err) {
    await graph.setBacking(overlay.name, null);
    throw err;
  }
}

/** blockdev-snapshot, its node left drained until `end` (a transaction's action). */
export async function takeSnapshot(
  graph: BlockGraph,
  nodeName: string,
  overlayName: string,
): Promise<SnapshotTaken> {
  const { node, end } = await drainedNode(graph, nodeName, nodeName);
  await inSection(end, () => appendOverlay(graph, node, overlayName));
  return { node: node.name, overlay: overlayName, end };
}

/** blockdev-snapshot: `overlay` (opened without backing) goes on top of `node`. */
export async function blockdevSnapshot(
  graph: BlockGraph,
  nodeName: string,
  overlayName: string,
): Promise<void> {
  (await takeSnapshot(graph, nodeName, overlayName)).end();
}

export interface BlockdevSnapshotSyncOptions {
  device?: string;
  nodeName?: string;
  snapshotFile: string;
  snapshotNodeName?: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/**
 * blockdev-snapshot-sync, its node left drained until `end`: creates (or, mode existing,
 * opens) the overlay, then snapshots.
 */
export async function takeSnapshotSync(
  graph: BlockGraph,
  o: BlockdevSnapshotSyncOptions,
): Promise<SnapshotTaken> {
  const { node, end } = await drainedNode(graph, o.device, o.nodeName);
  return inSection(end, async () => {
    if (o.nodeName !== undefined && o.snapshotNodeName === undefined) {
      throw new BlockError(BlockErrorCode.BAD_JOB, 'New overlay node-name missing');
    }
    if (o.snapshotNodeName !== undefined && graph.hasNode(o.snapshotNodeName)) {
      throw new BlockError(BlockErrorCode.BAD_JOB, 'New overlay node-name already in use');
    }
    const format = o.format ?? 'qcow2';
    if (format !== 'qcow2') {
      throw new BlockError(
        BlockErrorCode.NOT_SUPPORTED,
        `blockdev-snapshot-sync does not support format '${format}' (qcow2)`,
      );
    }
    if ((o.mode ?? 'absolute-paths') === 'absolute-paths') {
      await createImage(graph, o.snapshotFile, 'qcow2', node.size(), node);
    }
    const overlay = await graph.add({
      driver: format,
      ...(o.snapshotNodeName !== undefined && { 'node-name': o.snapshotNodeName }),
      file: { driver: 'file', filename: o.snapshotFile },
      backing: null,
    });
    try {
      await appendOverlay(graph, node, overlay.name);
    } catch (err) {
      await graph.del(overlay.name);
      throw err;
    }
    return { node: node.name, overlay: overlay.name, end };
  });
}

/** blockdev-snapshot-sync: creates (or, mode existing, opens) the overlay, then snapshots. */
export async function blockdevSnapshotSync(
  graph: BlockGraph,
  o: BlockdevSnapshotSyncOptions,
): Promise<{ node: string; overlay: string }> {
  const { node, overlay, end } = await takeSnapshotSync(graph, o);
  end();
  return { node, overlay };
}

/** Undoes blockdev-snapshot (a transaction's abort): the users go back to `node`, and the
 * overlay loses its backing. */
export async function snapshotUndo(
  graph: BlockGraph,
  node: string,
  overlay: string,
): Promise<void> {
  await graph.replaceNode(overlay, node);
  await graph.setBacking(overlay, null);
}

/**
 * A new image (blockdev-snapshot-sync, drive-mirror, drive-backup with absolute-paths):
 * qcow2, naming `backingNode`'s file and format in its header (when it has a file name),
 * or raw (an empty file of that size).
 */
export async function createImage(
  graph: BlockGraph,
  filename: string,
  format: 'qcow2' | 'raw',
  size: number,
  backingNode: ChildNode | null | undefined,
): Promise<void> {
  const backingFile = backingNode ? layerFilename(backingNode) : undefined;
  const backing =
    backingNode && backingFile !== undefined
      ? { file: backingFile, format: backingNode.driver }
      : undefined;
  const engine = await graph.engine('auto');
  const file = await engine.openFile(filename, { create: true });
  try {
    lockForCreate(file);
    await file.truncate(format === 'raw' ? size : 0);
  } finally {
    await file.close();
  }
  if (format === 'raw') return;
  const fileNode = await graph.add({ driver: 'file', filename });
  try {
    const backend = await graph.createBackend(fileNode.name, {
      perm: ['consistent-read', 'write', 'resize'],
      shared: ['consistent-read', 'write', 'write-unchanged', 'resize'],
    });
    try {
      await createQcow2(qcow2FileOf(fileNode), {
        size,
        ...(backing !== undefined && { backingFile: backing.file, backingFormat: backing.format }),
      });
    } finally {
      await backend.close();
    }
  } finally {
    await graph.del(fileNode.name);
  }
}
