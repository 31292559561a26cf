// The daemon's FUSE exports (`--export type=fuse`, block-export-add): each a BlockBackend
// of a node served by @vmdisk/fuse as a regular file over its mount point. The backend is
// the target, with what only a file needs added here: truncate (block_resize of the node)
// and the storage it takes (st_blocks, as QEMU's bdrv_get_allocated_file_size: the
// protocol file's blocks).
import { statSync } from 'node:fs';
import {
  type BlockBackend,
  type BlockGraph,
  blockResize,
  type NodeInfo,
  type PermissionName,
} from '@vmdisk/block-graph';
import { FuseError, FuseExport, type FuseTarget } from '@vmdisk/fuse';
import type { BlockExportInfo, BlockExportKind, ExportDeleted } from './export-kind.ts';
import type { Logger } from './log.ts';
import type { FuseExportConfig } from './options/serve-options.ts';
import { QmpError } from './qmp/monitor.ts';

interface FuseEntry {
  config: FuseExportConfig;
  backend: BlockBackend;
  fuse: FuseExport;
  shuttingDown: boolean;
}

const ALL_PERMS: PermissionName[] = ['consistent-read', 'write', 'write-unchanged', 'resize'];

export class FuseExports implements BlockExportKind<FuseExportConfig> {
  private readonly entries = new Map<string, FuseEntry>();
  private readonly graph: BlockGraph;
  private readonly log: Logger;
  private readonly onDeleted: ExportDeleted;

  constructor(graph: BlockGraph, log: Logger, onDeleted: ExportDeleted) {
    this.graph = graph;
    this.log = log;
    this.onDeleted = onDeleted;
  }

  async add(config: FuseExportConfig): Promise<void> {
    // As QEMU's: writable and growable exports hold 'resize' for as long as they exist;
    // everything is shared (blk_exp_add), the size may change under the file.
    const canResize = config.writable || config.growable;
    const backend = await this.graph.createBackend(config.nodeName, {
      name: `export:${config.id}`,
      perm: [
        'consistent-read',
        ...(config.writable ? (['write'] as const) : []),
        ...(canResize ? (['resize'] as const) : []),
      ],
      shared: ALL_PERMS,
    });
    let fuse: FuseExport;
    try {
      fuse = await FuseExport.mount({
        mountpoint: config.mountpoint,
        target: this.target(backend, config),
        writable: config.writable,
        growable: config.growable,
        allowOther: config.allowOther,
        onError: (err, errno) =>
          this.log.warn(
            { event: 'fuse-request-error', id: config.id, errno, error: err.message },
            'FUSE request failed',
          ),
      });
    } catch (e) {
      await backend.close();
      if (e instanceof FuseError) throw new QmpError('GenericError', e.message);
      throw e;
    }
    this.entries.set(config.id, { config, backend, fuse, shuttingDown: false });
    this.log.info(
      {
        event: 'export-add',
        type: 'fuse',
        id: config.id,
        node: config.nodeName,
        mountpoint: config.mountpoint,
        writable: config.writable,
        allowOther: fuse.allowOther,
      },
      'export added',
    );
  }

  /** Unmounts at once (open files fail from then on), as qemu-storage-daemon's. */
  async del(id: string): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) throw new QmpError('GenericError', `Export '${id}' is not found`);
    if (entry.shuttingDown)
      throw new QmpError('GenericError', `Export '${id}' is already shutting down`);
    entry.shuttingDown = true;
    await entry.fuse.close();
    this.entries.delete(id);
    await entry.backend.close();
    this.log.info({ event: 'export-deleted', id }, 'export deleted');
    this.onDeleted(id);
  }

  info(id: string): BlockExportInfo | undefined {
    const e = this.entries.get(id);
    return (
      e && { type: 'fuse', id, 'node-name': e.config.nodeName, 'shutting-down': e.shuttingDown }
    );
  }

  async closeAll(): Promise<void> {
    await Promise.all(
      [...this.entries.values()].filter((e) => !e.shuttingDown).map((e) => this.del(e.config.id)),
    );
  }

  private target(backend: BlockBackend, config: FuseExportConfig): FuseTarget {
    const graph = this.graph;
    const file = protocolFile(graph, config.nodeName);
    return {
      size: () => backend.size(),
      read: (offset, buf) => backend.read(offset, buf),
      ...(config.writable && {
        write: (offset: number, buf: Uint8Array, flags: { fua?: boolean }) =>
          backend.write(offset, buf, flags),
        writeZeroes: (
          offset: number,
          length: number,
          flags: { noHole?: boolean; fastZero?: boolean },
        ) => backend.writeZeroes(offset, length, flags),
      }),
      flush: () => backend.flush(),
      blockStatus: (offset, length, options) => backend.blockStatus(offset, length, options),
      allocBuffer: (length) => backend.allocBuffer(length),
      releaseBuffer: (buf) => backend.releaseBuffer(buf),
      get blockSize() {
        return backend.blockSize;
      },
      truncate: (size) => blockResize(graph, { nodeName: config.nodeName, size }),
      allocatedSize: async () => {
        if (file === undefined) return undefined;
        // Synchronous, as QEMU's fstat: a GETATTR waits in the kernel ahead of the reads
        // queued behind it (AUTO_INVAL_DATA), and a stat queued on the busy thread pool made
        // 4 KiB random reads at QD 32 fall to a third.
        try {
          return statSync(file).blocks * 512;
        } catch {
          return undefined;
        }
      },
    };
  }
}

/** The file name of the protocol node under `nodeName` (through format and filter nodes). */
function protocolFile(graph: BlockGraph, nodeName: string): string | undefined {
  const byName = new Map(graph.query().map((n) => [n['node-name'], n]));
  let n: NodeInfo | undefined = byName.get(nodeName);
  while (n) {
    if (typeof n.file === 'string') return n.file;
    const below = n.children.find((c) =>
      c.role.some((r) => r === 'primary' || r === 'filtered' || r === 'data'),
    );
    n = below ? byName.get(below['node-name']) : undefined;
  }
  return undefined;
}
