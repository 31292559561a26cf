// What the QMP commands drive: the interface the daemon implements. The composition root
// (root.ts) hands the daemon to registerCommands as this, so that the commands never
// import the daemon (no daemon <-> commands cycle).
import type { JobRegistry } from '@vmdisk/ao';
import type { BlockGraph, OptionSyntax } from '@vmdisk/block-graph';
import type { ListenAddress } from '@vmdisk/nbd';
import type { ChardevRegistry } from '../chardevs.ts';
import type { ExportConfig, NbdServerConfig } from '../options/serve-options.ts';

export interface DaemonControl {
  readonly graph: BlockGraph;
  readonly jobs: JobRegistry;
  readonly chardevs: ChardevRegistry;
  blockdevAdd(options: Record<string, unknown>, syntax: OptionSyntax): Promise<void>;
  blockdevDel(nodeName: string): Promise<void>;
  queryNamedBlockNodes(flat?: boolean): Promise<Record<string, unknown>[]>;
  nbdServerStart(config: NbdServerConfig): Promise<ListenAddress>;
  nbdServerStop(): Promise<void>;
  blockExportAdd(config: ExportConfig): Promise<void>;
  blockExportDel(id: string, mode?: 'safe' | 'hard'): void;
  queryBlockExports(): {
    type: string;
    id: string;
    'node-name': string;
    'shutting-down': boolean;
  }[];
  /** object-add / --object: an object of the graph's registry. */
  objectAdd(options: Record<string, unknown>, syntax: OptionSyntax): Promise<void>;
  /** object-del: refused while the object is in use. */
  objectDel(id: string): Promise<void>;
  /** Removes every export and stops the NBD server (BLOCK_EXPORT_DELETED for each). */
  closeExports(): Promise<void>;
  stop(): Promise<void>;
}
