// The fast path of an export served in iothreads: its READs are served by the workers
// from the file itself (their own engine), when nothing in the graph must see a read:
// the export's node is `file`, or `raw` over `file` without offset/size, and the export's
// backend is attached to it directly (no filter inserted above it). Writes and everything
// else are always forwarded (bitmaps, write notifiers and jobs see them).
//
// While the workers read, the main thread holds the graph lock's read side for them, as
// one long request: a graph change (reopen, a filter or job inserted, a node replaced,
// export removal) drains it like any request: the workers stop, wait for their reads in
// flight and say so, then the read side is released. When the change is over, the
// conditions are checked again. (QEMU drains a node across AioContexts the same way.)
import type { BlockBackend, BlockGraph } from '@vmdisk/block-graph';
import type { IoThread } from './iothread.ts';
import type { FastFile } from './messages.ts';

/** The file a worker may read for the export's node, if reads may bypass the graph. */
export function fastFile(
  graph: BlockGraph,
  backend: BlockBackend,
  nodeName: string,
): FastFile | undefined {
  if (!graph.hasNode(nodeName) || backend.nodeName !== nodeName) return undefined;
  let node = graph.node(nodeName);
  if (node.driver === 'raw') {
    const o = graph.nodeConfig(nodeName).options;
    if (o.offset !== undefined || o.size !== undefined) return undefined;
    const child = node.primary?.node;
    if (child === undefined) return undefined;
    node = child;
  }
  if (node.driver !== 'file' || node.filename === undefined) return undefined;
  const { settings, options } = graph.nodeConfig(node.name);
  const aio = typeof options.aio === 'string' ? options.aio : undefined;
  return { filename: node.filename, direct: settings.direct, ...(aio !== undefined && { aio }) };
}

export class FastReads {
  private state: 'off' | 'on' | 'revoking' = 'off';
  private readonly graph: BlockGraph;
  private readonly backend: BlockBackend;
  private readonly nodeName: string;
  private readonly name: string;
  private readonly threads: readonly IoThread[];
  private unobserve: (() => void) | undefined;

  constructor(
    graph: BlockGraph,
    backend: BlockBackend,
    nodeName: string,
    name: string,
    threads: readonly IoThread[],
  ) {
    this.graph = graph;
    this.backend = backend;
    this.nodeName = nodeName;
    this.name = name;
    this.threads = threads;
    this.unobserve = graph.lock.observeDrain({
      begin: () => this.revoke(),
      end: () => this.grant(),
    });
    this.grant();
  }

  /** Whether the workers read the file themselves now (for tests and logs). */
  get active(): boolean {
    return this.state === 'on';
  }

  /** The export is gone (its connections too): no more fast reads, the lease released. */
  stop(): void {
    this.unobserve?.();
    this.unobserve = undefined;
    if (this.state === 'on') {
      for (const t of this.threads) void t.fastOff(this.name);
      this.graph.lock.releaseRead();
    }
    this.state = 'off';
  }

  private grant(): void {
    if (this.state !== 'off' || this.unobserve === undefined) return;
    const file = fastFile(this.graph, this.backend, this.nodeName);
    if (file === undefined) return;
    if (!this.graph.lock.tryRead()) return;
    this.state = 'on';
    for (const t of this.threads) t.fastOn(this.name, file);
  }

  private revoke(): void {
    if (this.state !== 'on') return;
    this.state = 'revoking';
    // Every worker has stopped reading (or is gone): the graph may change.
    void Promise.all(this.threads.map((t) => t.fastOff(this.name))).then(() => {
      this.state = 'off';
      this.graph.lock.releaseRead();
    });
  }
}
