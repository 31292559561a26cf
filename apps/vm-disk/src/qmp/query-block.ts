// query-block: the block devices (BlockBackends of guest devices) and their media.
// qemu-storage-daemon has no devices, so it lists none, exports' backends included; so
// does vm-disk (its nodes are in query-named-block-nodes).
import type { QmpMonitor } from './monitor.ts';

export function registerQueryBlock(monitor: QmpMonitor): void {
  monitor.register({ name: 'query-block', run: () => [] });
}
