// blockdev-reopen (QEMU 7.2, qapi/block-core.json): new options for nodes that are open,
// each given whole as blockdev-add takes them (only the changeable ones may differ), as
// one transaction. The work is BlockGraph.reopenMultiple (graph-reopen.ts).
import { schema } from '@vmdisk/block-graph';
import type { DaemonControl } from './daemon-control.ts';
import type { QmpMonitor } from './monitor.ts';

const { list, struct } = schema;

export function registerReopenCommands(monitor: QmpMonitor, daemon: DaemonControl): void {
  // Each element is checked by the block graph as blockdev-add's options are (with their
  // path: "Parameter 'options[0].file' is missing"), described as the same union.
  const blockdevOptions = { ...schema.object('BlockdevOptions'), info: daemon.graph.optionsInfo() };
  monitor.register({
    name: 'blockdev-reopen',
    args: struct({ options: list(blockdevOptions) }),
    run: async (args) => {
      await daemon.graph.reopenMultiple(args.options);
    },
  });
}
