// The state a BlockGraph is built on: its nodes, backends and drivers, the edges between
// them and the references they hold (QEMU's bdrv_ref / bdrv_unref, bdrv_replace_child),
// and the I/O engines and buffers its nodes share. Graph changes (graph.ts) and opening
// nodes (graph-open.ts) are done on top of it.

import type { Socket } from 'node:net';
import type { BlockBackend } from './backend.ts';
import { DEFAULT_MAX_BACKING_DEPTH } from './backing-chain.ts';
import type { BlockDriver, EngineLike } from './driver.ts';
import { builtinDrivers } from './drivers/index.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import { refreshPermissions } from './graph-permissions.ts';
import type { BlockNode, ChildEdge, GraphEvent } from './node.ts';
import { ObjectRegistry } from './objects.ts';

type EngineBackend = 'io_uring' | 'aio' | 'threadpool' | 'auto';

export interface BlockGraphOptions {
  /** Extra drivers (e.g. qcow2, nbd) beside the built-in ones. */
  drivers?: readonly BlockDriver[];
  /**
   * The most backing files one node may have below it (DEFAULT_MAX_BACKING_DEPTH): a deeper
   * chain fails to open with BACKING_CHAIN_TOO_DEEP.
   */
  maxBackingDepth?: number;
  /** The object registry (default: a new one) the graph's drivers take objects from. */
  objects?: ObjectRegistry;
  /** Events of the graph's nodes (BLOCK_WRITE_THRESHOLD), called as they happen. */
  onEvent?: (event: GraphEvent) => void;
  /**
   * Called with each socket a driver connects (the nbd driver's, before its handshake),
   * for socket options Node's net module has no call for: vm-disk gives unix sockets a
   * larger send buffer. If it throws, the node fails to open.
   */
  configureSocket?: (socket: Socket) => void;
  /**
   * The file driver's SEEK_DATA/SEEK_HOLE (its block status) made on the calling thread
   * where the filesystem answers them from its extent tree (the engine's
   * OpenFileOptions.inlineSeeks). For a process whose event loop serves nothing else, such
   * as an image tool; a daemon keeps them on the thread pool. Default false.
   */
  inlineSeeks?: boolean;
}

export class GraphNodes {
  protected readonly nodes = new Map<string, BlockNode>();
  protected readonly backends = new Set<BlockBackend>();
  protected readonly drivers = new Map<string, BlockDriver>();
  private readonly engines = new Map<string, Promise<EngineLike>>();
  private bufferEngine: EngineLike | undefined;
  /** The objects (--object, object-add) drivers use: throttle groups, TLS credentials. */
  readonly objects: ObjectRegistry;
  protected readonly maxBackingDepth: number;
  readonly #onEvent: ((event: GraphEvent) => void) | undefined;
  /** BlockGraphOptions.configureSocket, given to the drivers (OpenContext). */
  readonly configureSocket: ((socket: Socket) => void) | undefined;
  /** BlockGraphOptions.inlineSeeks, given to the drivers (OpenContext). */
  readonly inlineSeeks: boolean;
  /** The identity (dev:ino) of each open file node, to find backing chains that loop. */
  protected readonly fileIds = new WeakMap<BlockNode, string>();

  constructor(options: BlockGraphOptions = {}) {
    this.maxBackingDepth = options.maxBackingDepth ?? DEFAULT_MAX_BACKING_DEPTH;
    this.objects = options.objects ?? new ObjectRegistry();
    this.#onEvent = options.onEvent;
    this.configureSocket = options.configureSocket;
    this.inlineSeeks = options.inlineSeeks === true;
    if (!Number.isSafeInteger(this.maxBackingDepth) || this.maxBackingDepth < 0) {
      throw new BlockOptionError('maxBackingDepth', 'expected a non-negative integer');
    }
    for (const d of builtinDrivers) this.drivers.set(d.name, d);
    for (const d of options.drivers ?? []) this.drivers.set(d.name, d);
  }

  /** A node's event, to the graph's user (BlockGraphOptions.onEvent). */
  nodeEvent(event: GraphEvent): void {
    this.#onEvent?.(event);
  }

  // ---------------------------------------------------------------- buffers and engines

  /** A buffer for I/O: page-aligned engine arena memory once an engine is in use. */
  allocBuffer(length: number): Buffer {
    const engine = this.bufferEngine;
    if (!engine || length === 0) return Buffer.allocUnsafe(length);
    return engine.allocBuffer(length);
  }

  /** Gives back a buffer of allocBuffer's; any other is left to the garbage collector. */
  releaseBuffer(buf: Uint8Array): void {
    const engine = this.bufferEngine;
    if (engine?.ownsBuffer(buf)) engine.releaseBuffer(buf as Buffer);
  }

  /** The shared I/O engine of this JS thread for a backend (what file nodes use). */
  engine(backend: EngineBackend): Promise<EngineLike> {
    let p = this.engines.get(backend);
    if (!p) {
      p = import('@vmdisk/engine').then((m) => m.sharedEngine(backend));
      this.engines.set(backend, p);
      p.then(
        (e) => {
          this.bufferEngine ??= e;
        },
        () => this.engines.delete(backend),
      );
    }
    return p.then((e) => {
      this.bufferEngine ??= e;
      return e;
    });
  }
  protected lookup(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) throw new BlockError(BlockErrorCode.NODE_NOT_FOUND, `no node named '${name}'`);
    return n;
  }

  protected releaseObjects(node: BlockNode): void {
    for (const id of node.objects.splice(0)) this.objects.release(id);
  }

  protected link(edge: ChildEdge): void {
    edge.node.parents.add(edge);
  }

  protected unlink(edge: ChildEdge): void {
    edge.node.parents.delete(edge);
  }

  /** Tells the driver of an edge's parent that its backing child changed (see FormatInstance). */
  protected backingChanged(edge: ChildEdge): void {
    if (edge.parent.isBackend || !edge.roles.includes('cow')) return;
    const parent = edge.parent as BlockNode;
    if (parent.closed) return;
    const inst = parent.instance;
    if (inst?.kind === 'format') inst.backingChanged?.(parent.backing);
  }

  protected repoint(edge: ChildEdge, to: BlockNode): void {
    edge.node.parents.delete(edge);
    edge.node = to;
    to.parents.add(edge);
  }

  /** Drops a reference; the last one closes the node and drops its children's. */
  protected async unref(node: BlockNode): Promise<void> {
    node.refcount--;
    if (node.refcount > 0 || node.closed) return;
    node.closed = true;
    this.nodes.delete(node.name);
    this.releaseObjects(node);
    try {
      // The bitmaps first (they need the image open); the image closes even if that failed.
      await node.storePersistentBitmaps().finally(() => node.instance?.close?.());
    } finally {
      for (const e of [...node.children.values()]) {
        this.unlink(e);
        node.children.delete(e.name);
        await this.unref(e.node);
      }
    }
  }

  /** @internal Every node below `node` (not itself). */
  descendants(node: BlockNode): Set<BlockNode> {
    const out = new Set<BlockNode>();
    const walk = (n: BlockNode) => {
      for (const c of n.children.values()) {
        if (!out.has(c.node)) {
          out.add(c.node);
          walk(c.node);
        }
      }
    };
    walk(node);
    return out;
  }

  /** Recomputes, checks and applies every permission (graph-permissions.ts); nothing changes when it throws. */
  protected refreshPermissions(): void {
    refreshPermissions(this.nodes, this.backends, this.drivers);
  }
}
