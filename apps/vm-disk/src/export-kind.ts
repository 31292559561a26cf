// What the daemon asks of each kind of block export (nbd, vhost-user-blk, fuse), so that
// block-export-add/-del/query-block-exports treat them alike: the daemon keeps the ids
// (unique across kinds, as QEMU's blk_exp_add checks) and their order, a kind keeps its
// exports and tells the daemon when one is gone (BLOCK_EXPORT_DELETED).
import type { ExportConfig } from './options/serve-options.ts';

/** One entry of query-block-exports (QEMU's BlockExportInfo). */
export interface BlockExportInfo {
  type: string;
  id: string;
  'node-name': string;
  'shutting-down': boolean;
}

export interface BlockExportKind<C extends ExportConfig = ExportConfig> {
  /** Creates the export, with the kind's checks and errors; throws and leaves nothing. */
  add(config: C): Promise<void>;
  /**
   * block-export-del of one of this kind's exports. The kind calls its `onDeleted` when
   * the export is gone: before this resolves, or later (an NBD export's clients).
   */
  del(id: string, mode: 'safe' | 'hard'): Promise<void>;
  info(id: string): BlockExportInfo | undefined;
  /** Removes every export (at shutdown). */
  closeAll(): Promise<void>;
}

/** Called by a kind once an export is gone. */
export type ExportDeleted = (id: string) => void;
