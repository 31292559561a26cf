// An export kind whose module is loaded by its first block-export-add. The vhost-user-blk
// and FUSE kinds bring @vmdisk/vhost-user, @vmdisk/fuse and @vmdisk/native (and their
// koffi bindings) that a daemon serving only NBD never runs; loading them at start-up cost
// idle resident memory (issue 18, docs/architecture.md "Memory").
import type { BlockExportInfo, BlockExportKind } from './export-kind.ts';
import type { ExportConfig } from './options/serve-options.ts';

export class LazyExportKind<C extends ExportConfig> implements BlockExportKind<C> {
  private readonly load: () => Promise<BlockExportKind<C>>;
  private kind: BlockExportKind<C> | undefined;
  private loading: Promise<BlockExportKind<C>> | undefined;

  constructor(load: () => Promise<BlockExportKind<C>>) {
    this.load = load;
  }

  async add(config: C): Promise<void> {
    // Concurrent adds share one load; a failed load is tried again by the next add.
    this.loading ??= this.load().then(
      (kind) => {
        this.kind = kind;
        return kind;
      },
      (err: unknown) => {
        this.loading = undefined;
        throw err;
      },
    );
    await (await this.loading).add(config);
  }

  del(id: string, mode: 'safe' | 'hard'): Promise<void> {
    // The daemon only asks a kind about ids it added: the module is loaded by then.
    if (!this.kind) return Promise.reject(new Error(`export '${id}' of an unloaded kind`));
    return this.kind.del(id, mode);
  }

  info(id: string): BlockExportInfo | undefined {
    return this.kind?.info(id);
  }

  async closeAll(): Promise<void> {
    // A load under way (an add at shutdown) may still create an export: close it too.
    const kind = this.kind ?? (await this.loading?.catch(() => undefined));
    await kind?.closeAll();
  }
}
