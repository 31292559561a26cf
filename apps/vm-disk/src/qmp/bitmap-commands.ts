// The QMP commands of dirty bitmaps, with QEMU 7.2's arguments (qapi/block-core.json):
// block-dirty-bitmap-add, -remove, -clear, -enable, -disable and -merge. The work and the
// checks are in @vmdisk/block-graph (dirty-bitmap-ops.ts); query-named-block-nodes lists
// the bitmaps (the graph's query).
import {
  blockDirtyBitmapAdd,
  blockDirtyBitmapClear,
  blockDirtyBitmapEnable,
  blockDirtyBitmapMerge,
  blockDirtyBitmapOrStr,
  blockDirtyBitmapRemove,
  schema,
} from '@vmdisk/block-graph';
import type { DaemonControl } from './daemon-control.ts';
import type { QmpMonitor } from './monitor.ts';

const { bool, list, opt, str, struct, uint32 } = schema;

/** QEMU's BlockDirtyBitmap: a node and one of its bitmaps. */
export const blockDirtyBitmap = struct({ node: str, name: str });

/** BlockDirtyBitmapAdd. */
export const blockDirtyBitmapAddArgs = struct({
  node: str,
  name: str,
  granularity: opt(uint32),
  persistent: opt(bool),
  disabled: opt(bool),
});

/** BlockDirtyBitmapMerge. */
export const blockDirtyBitmapMergeArgs = struct({
  node: str,
  target: str,
  bitmaps: list(blockDirtyBitmapOrStr),
});

export function registerBitmapCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  const { graph } = daemon;
  monitor.register({
    name: 'block-dirty-bitmap-add',
    args: blockDirtyBitmapAddArgs,
    run: (args) => {
      blockDirtyBitmapAdd(graph, args);
    },
  });
  monitor.register({
    name: 'block-dirty-bitmap-remove',
    args: blockDirtyBitmap,
    run: (args) => blockDirtyBitmapRemove(graph, args.node, args.name),
  });
  monitor.register({
    name: 'block-dirty-bitmap-clear',
    args: blockDirtyBitmap,
    run: (args) => blockDirtyBitmapClear(graph, args.node, args.name),
  });
  monitor.register({
    name: 'block-dirty-bitmap-enable',
    args: blockDirtyBitmap,
    run: (args) => blockDirtyBitmapEnable(graph, args.node, args.name, true),
  });
  monitor.register({
    name: 'block-dirty-bitmap-disable',
    args: blockDirtyBitmap,
    run: (args) => blockDirtyBitmapEnable(graph, args.node, args.name, false),
  });
  monitor.register({
    name: 'block-dirty-bitmap-merge',
    args: blockDirtyBitmapMergeArgs,
    run: (args) => blockDirtyBitmapMerge(graph, args.node, args.target, args.bitmaps),
  });
}
