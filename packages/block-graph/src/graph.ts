// BlockGraph: named nodes created from blockdev-add-shaped options, edges (ChildEdge) with
// roles and permissions, refcounting, the graph lock, and the graph changes (add, delete,
// replace a child, replace a node), each done under the write side of the lock.

import { type BackendHost, type BackendOptions, BlockBackend } from './backend.ts';
import type { BlockDriver, ChildNode } from './driver.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import { GraphLock } from './graph-lock.ts';
import type { BlockGraphOptions } from './graph-nodes.ts';
import { GraphReopener } from './graph-reopen.ts';
import { checkLinkNotFrozen, checkNotBusy } from './jobs/op-blockers.ts';
import { BlockNode, ChildEdge, type NodeSettings } from './node.ts';
import type { BlockAcctStats } from './node-stats.ts';
import type { ObjectInfo } from './objects.ts';
import { blockdevOptionsInfo, checkOptions, type NodeSpec, type OptionSyntax } from './options.ts';
import { type PermissionName, permBits, permNames } from './permissions.ts';
import type { TypeInfo } from './schema.ts';

export type { BlockGraphOptions } from './graph-nodes.ts';

/** One node as query-named-block-nodes shows it. */
export interface NodeInfo {
  'node-name': string;
  driver: string;
  /** Virtual size in bytes. */
  size: number;
  'read-only': boolean;
  refcount: number;
  /** Cumulative permissions the parents take, and what they all share. */
  perm: PermissionName[];
  shared: PermissionName[];
  children: {
    child: string;
    role: string[];
    'node-name': string;
    perm: PermissionName[];
    shared: PermissionName[];
  }[];
  parents: { parent: string; child: string; backend: boolean }[];
  'cache-direct': boolean;
  /** block-set-write-threshold's, 0 when off. */
  'write-threshold': number;
  /** Driver-specific fields (e.g. file: the filename). */
  [key: string]: unknown;
}

/** How BlockGraph.add reads its options. */
export interface AddOptions {
  /** 'json' (the default: typed, as QMP) or 'keyval' (strings, as the command line). */
  syntax?: OptionSyntax;
  /** Refuse a root node without a node-name (QEMU's blockdev-add). */
  requireNodeName?: boolean;
}

export class BlockGraph extends GraphReopener implements BackendHost {
  /** The graph lock: requests hold the read side, graph changes the write side. */
  readonly lock = new GraphLock();
  private backendSeq = 0;
  private closed = false;

  constructor(options: BlockGraphOptions = {}) {
    super(options);
    this.lock.onDrainBegin = () => {
      for (const n of this.nodes.values()) if (n.instance) n.instance.drainBegin?.();
    };
  }

  /** Makes a driver known to this graph (replacing one of the same name). */
  registerDriver(driver: BlockDriver): void {
    this.drivers.set(driver.name, driver);
  }

  /** blockdev-add's options for the drivers known, as query-qmp-schema describes them. */
  optionsInfo(): TypeInfo {
    return blockdevOptionsInfo(this.drivers.values());
  }

  /** The names of the drivers known. */
  driverNames(): string[] {
    return [...this.drivers.keys()];
  }

  // ---------------------------------------------------------------- lookups and queries

  /** The node of that name: its I/O and facts (what a driver sees of a child). */
  node(name: string): ChildNode {
    return this.lookup(name);
  }

  /** The I/O accounting of the node of that name (query-blockstats, metrics). */
  nodeStats(name: string): BlockAcctStats {
    return this.lookup(name).stats;
  }

  hasNode(name: string): boolean {
    return this.nodes.has(name);
  }

  /**
   * block-set-write-threshold: BLOCK_WRITE_THRESHOLD (BlockGraphOptions.onEvent) when a
   * write first ends beyond `threshold` bytes of the node; 0 turns it off.
   */
  setWriteThreshold(nodeName: string, threshold: number): void {
    this.lookup(nodeName).writeThreshold = threshold;
  }

  /** All nodes, as query-named-block-nodes shows them (parents before children). */
  query(): NodeInfo[] {
    return [...this.nodes.values()].map((n) => {
      const info: NodeInfo = {
        'node-name': n.name,
        driver: n.driver,
        size: n.instance ? n.size() : 0,
        'read-only': n.readOnly,
        refcount: n.refcount,
        perm: permNames(n.perm),
        shared: permNames(n.shared),
        children: [...n.children.values()].map((c) => ({
          child: c.name,
          role: [...c.roles],
          'node-name': c.node.name,
          perm: permNames(c.perm),
          shared: permNames(c.shared),
        })),
        parents: [...n.parents].map((c) => ({
          parent: c.parent.name,
          child: c.name,
          backend: c.parent.isBackend,
        })),
        'cache-direct': n.settings.direct,
        'write-threshold': n.writeThreshold,
        ...(n.instance?.info?.() ?? {}),
        // QEMU's BlockDeviceInfo: only when there are some, newest first.
        ...(n.dirtyBitmaps.length > 0 && {
          'dirty-bitmaps': n.dirtyBitmaps.map((b) => b.info()).reverse(),
        }),
      };
      return info;
    });
  }

  /**
   * The settings a node opened with and the options it was added with (a format's children
   * as given: node names, inline options, or null), for query-named-block-nodes.
   */
  nodeConfig(name: string): {
    settings: Readonly<NodeSettings>;
    options: Readonly<Record<string, unknown>>;
  } {
    const n = this.lookup(name);
    return { settings: n.settings, options: n.options };
  }

  /** The backends attached now. */
  backendList(): BlockBackend[] {
    return [...this.backends];
  }

  // ---------------------------------------------------------------- drained sections

  /** Begins a drained section (nests): resolves when no request is in flight. */
  drainedBegin(): Promise<void> {
    return this.lock.drainedBegin();
  }

  drainedEnd(): void {
    this.lock.drainedEnd();
  }

  // ---------------------------------------------------------------- graph changes

  /**
   * blockdev-add: creates a node (and its inline children) from options, typed as JSON
   * (QMP) or keyval strings (the command line). `requireNodeName`: refuse a root node
   * without a name, as QEMU's blockdev-add does (after checking the options' types).
   */
  async add(options: unknown, how: AddOptions = {}): Promise<ChildNode> {
    this.checkOpen();
    const spec = checkOptions(options, this.drivers, '', how.syntax ?? 'json');
    if (how.requireNodeName && spec.nodeName === undefined) {
      throw new BlockOptionError(
        'node-name',
        'must be specified for the root node',
        "'node-name' must be specified for the root node",
      );
    }
    return this.lock.write(async () => {
      this.checkNames(spec, new Set());
      const node = await this.open(spec, undefined);
      node.ownedByUser = true; // open() handed out one reference: the user's
      return node;
    });
  }

  /**
   * blockdev-del: removes a node added by name, refused while it has parents; the checks
   * and their words in QEMU's order (qmp_blockdev_del).
   */
  async del(name: string): Promise<void> {
    await this.lock.write(async () => {
      const node = this.nodes.get(name);
      if (!node) {
        throw new BlockError(
          BlockErrorCode.NODE_NOT_FOUND,
          `Failed to find node with node-name='${name}'`,
        );
      }
      const parents = [...node.parents];
      if (parents.some((e) => e.parent.isBackend && !e.parent.jobChild)) {
        throw new BlockError(BlockErrorCode.NODE_IN_USE, `Node ${name} is in use`);
      }
      checkNotBusy(this, name);
      const overlay = parents.find((e) => !e.parent.isBackend && e.name === 'backing');
      if (overlay) {
        throw new BlockError(
          BlockErrorCode.NODE_BUSY,
          `Node '${name}' is busy: node is used as backing hd of '${overlay.parent.name}'`,
        );
      }
      if (!node.ownedByUser) {
        throw new BlockError(
          BlockErrorCode.NODE_IN_USE,
          `Node ${name} is not owned by the monitor`,
        );
      }
      if (parents.length > 0) {
        throw new BlockError(BlockErrorCode.NODE_IN_USE, `Block device ${name} is in use`);
      }
      node.ownedByUser = false;
      await this.unref(node);
      this.refreshPermissions();
    });
  }

  /**
   * blockdev-reopen: new options for open nodes (blockdev-add-shaped, a node-name each),
   * as one drained change; the children they opened inline follow (graph-reopen.ts).
   */
  async reopenMultiple(list: readonly unknown[]): Promise<void> {
    this.checkOpen();
    // QEMU drains each node named (block jobs over them pause), then reopens.
    const named = list.map((o) => (o as { 'node-name'?: unknown } | null)?.['node-name']);
    const drained = named.filter((n): n is string => typeof n === 'string' && this.nodes.has(n));
    await this.lock.write(() => this.reopenQueue(list), { subtree: drained });
  }

  /**
   * Reopens one node with `changes` over the options it has (e.g. {'read-only': false}):
   * QEMU's bdrv_reopen_set_read_only, as block jobs use it.
   */
  async reopen(nodeName: string, changes: Record<string, unknown>): Promise<void> {
    this.checkOpen();
    await this.lock.write(() => {
      const node = this.lookup(nodeName);
      const options: Record<string, unknown> = { ...node.options, 'node-name': nodeName };
      for (const [key, edge] of node.children) options[key] = edge.node.name;
      return this.reopenQueue([{ ...options, ...changes }], 'reopen');
    });
  }

  /** A backend on a node: takes the permissions it needs (write: it writes). */
  async createBackend(nodeName: string, options: BackendOptions = {}): Promise<BlockBackend> {
    this.checkOpen();
    return this.lock.write(async () => {
      const node = this.lookup(nodeName);
      const backend = new BlockBackend(
        this,
        options.name ?? `backend${++this.backendSeq}`,
        options,
      );
      const edge = new ChildEdge('root', ['primary'], backend, node);
      const { perm, shared } = backend.wantedPerms();
      edge.perm = perm;
      edge.shared = shared;
      this.link(edge);
      try {
        this.refreshPermissions();
      } catch (err) {
        this.unlink(edge);
        throw err;
      }
      node.refcount++;
      backend.attach(edge);
      this.backends.add(backend);
      return backend;
    });
  }

  /**
   * A backend's permissions change (QEMU blk_set_perm): refused, nothing changed, when
   * another user of the node does not share what it now takes or takes what it no longer
   * shares.
   */
  async setBackendPerms(
    backend: BlockBackend,
    perm: readonly PermissionName[],
    shared: readonly PermissionName[],
  ): Promise<void> {
    await this.lock.write(() => {
      const edge = backend.edge;
      if (!edge) throw new BlockError(BlockErrorCode.CLOSED, `backend '${backend.name}' is closed`);
      const old = { perm: edge.perm, shared: edge.shared };
      edge.perm = permBits(perm);
      edge.shared = permBits(shared);
      try {
        this.refreshPermissions();
      } catch (err) {
        edge.perm = old.perm;
        edge.shared = old.shared;
        throw err;
      }
    });
  }

  /**
   * @internal: detaches a backend (BlockBackend.close). QEMU 7.2 drains the node twice as
   * a BlockBackend lets go of it (blk_remove_bs: blk_drain, then again as its root child
   * goes; seen side by side): block jobs over the node or above it pause and resume twice.
   * A block job's own hold on a node (jobChild) is QEMU's child_job, no BlockBackend.
   */
  async detachBackend(backend: BlockBackend, edge: ChildEdge): Promise<void> {
    const scope = backend.jobChild ? undefined : { nodes: [edge.node.name] };
    if (scope) await this.lock.write(() => undefined, scope);
    await this.lock.write(
      async () => {
        this.backends.delete(backend);
        backend.attach(undefined);
        this.unlink(edge);
        await this.unref(edge.node);
        this.refreshPermissions();
      },
      scope && { nodes: [edge.node.name] },
    );
  }

  /** Points a node's child edge at another node (blockdev-reopen of one child). */
  async replaceChild(parentName: string, childName: string, newNodeName: string): Promise<void> {
    await this.lock.write(async () => {
      const parent = this.lookup(parentName);
      const edge = parent.children.get(childName);
      if (!edge) {
        throw new BlockError(
          BlockErrorCode.BAD_GRAPH_CHANGE,
          `node '${parentName}' has no child '${childName}'`,
        );
      }
      const next = this.lookup(newNodeName);
      const old = edge.node;
      if (old === next) return;
      this.repoint(edge, next);
      try {
        this.refreshPermissions();
      } catch (err) {
        this.repoint(edge, old);
        this.refreshPermissions();
        throw err;
      }
      this.backingChanged(edge);
      next.refcount++;
      await this.unref(old);
      this.refreshPermissions();
    });
  }

  /**
   * Points a node's backing link at another node, or drops it (null): what stream and
   * commit do at their end and blockdev-snapshot does to its overlay (bdrv_set_backing_hd),
   * drained. `before` runs first, under the lock (the image's header change); layers
   * no one holds any more close.
   */
  async setBacking(
    parentName: string,
    backingName: string | null,
    before?: () => Promise<void>,
  ): Promise<void> {
    await this.lock.write(async () => {
      const parent = this.lookup(parentName);
      checkLinkNotFrozen(this, parentName);
      const next = backingName === null ? undefined : this.lookup(backingName);
      const edge = parent.backing;
      const old = edge?.node;
      if (old === next) return;
      const key = edge?.name ?? 'backing';
      if (!edge && !(this.drivers.get(parent.driver)?.children ?? []).some((c) => c.key === key)) {
        throw new BlockError(
          BlockErrorCode.BAD_GRAPH_CHANGE,
          `Driver '${parent.driver}' of node '${parentName}' does not support backing files`,
        );
      }
      const added = edge ?? new ChildEdge(key, ['cow'], parent, next!);
      const undo = (): void => {
        if (edge) this.repoint(edge, old!);
        else {
          this.unlink(added);
          parent.children.delete(key);
        }
        if (edge && !next) {
          this.link(edge);
          parent.children.set(key, edge);
        }
      };
      if (edge && next) this.repoint(edge, next);
      else if (edge) {
        this.unlink(edge);
        parent.children.delete(key);
      } else {
        this.link(added);
        parent.children.set(key, added);
      }
      try {
        this.refreshPermissions();
        await before?.();
      } catch (err) {
        undo();
        this.refreshPermissions();
        throw err;
      }
      this.backingChanged(added);
      if (next) next.refcount++;
      if (old) await this.unref(old);
      this.refreshPermissions();
    });
  }

  /**
   * Moves every parent of `from` (nodes and backends) to `to`, except `to` itself and its
   * descendants' edges that point at `from` (bdrv_replace_node): how a filter is inserted
   * above a node (add it with the node as child, then replaceNode(node, filter)) and
   * removed (replaceNode(filter, node), then del(filter)).
   */
  async replaceNode(fromName: string, toName: string): Promise<void> {
    await this.lock.write(() => this.moveParents(this.lookup(fromName), this.lookup(toName)));
  }

  /** replaceNode's change, under the write lock. */
  private async moveParents(from: BlockNode, to: BlockNode): Promise<void> {
    if (from === to) return;
    const below = this.descendants(to);
    const moved = [...from.parents].filter(
      (e) => !(e.parent instanceof BlockNode && below.has(e.parent)) && e.parent !== to,
    );
    for (const e of moved) this.repoint(e, to);
    try {
      this.refreshPermissions();
    } catch (err) {
      for (const e of moved) this.repoint(e, from);
      this.refreshPermissions();
      throw err;
    }
    for (const e of moved) this.backingChanged(e);
    to.refcount += moved.length;
    from.refcount -= moved.length - 1;
    await this.unref(from);
    this.refreshPermissions();
  }

  /**
   * Opens an implicit filter node of `driver` (mirror_top, or a backup's copy-before-write)
   * over `childName` as its 'backing' child (or with the children `how` gives), and moves
   * every parent of the child onto it, as one drained change (QEMU bdrv_new_open_driver +
   * bdrv_append). `then` runs in the same change.
   */
  async insertFilter(
    driver: BlockDriver,
    childName: string,
    nodeName: string | undefined,
    then?: (filter: BlockNode) => void,
    how: {
      options?: Record<string, unknown>;
      children?: Record<string, string>;
      /** Default: the child's (commit_top is read-only whatever top is). */
      readOnly?: boolean;
    } = {},
  ): Promise<BlockNode> {
    this.checkOpen();
    return this.lock.write(async () => {
      const child = this.lookup(childName);
      const spec: NodeSpec = {
        driver,
        ...(nodeName !== undefined && { nodeName }),
        readOnly: how.readOnly ?? child.readOnly,
        discard: child.settings.discard,
        options: how.options ?? {},
        // 'backing' by default (mirror_top); copy-before-write has 'file' and 'target'.
        children: how.children ?? { backing: childName },
        path: '',
        raw: { driver: driver.name },
      };
      this.checkNames(spec, new Set());
      const filter = await this.open(spec, undefined);
      filter.implicit = nodeName === undefined;
      try {
        await this.moveParents(child, filter);
        then?.(filter);
      } catch (err) {
        await this.unref(filter);
        this.refreshPermissions();
        throw err;
      }
      return filter;
    });
  }

  /**
   * Takes an implicit filter out: its parents move to `replacement` (its child, or the
   * node a mirror pivots to) and it closes, as one drained change; `before` runs first in
   * the same change (a mirror's last copy, with no request in flight).
   */
  async removeFilter(
    filterName: string,
    replacementName: string,
    before?: () => Promise<void>,
    replace?: { from: string; to: string },
  ): Promise<void> {
    await this.lock.write(async () => {
      const filter = this.lookup(filterName);
      await before?.();
      await this.moveParents(filter, this.lookup(replacementName));
      await this.unref(filter); // the reference insertFilter kept
      this.refreshPermissions();
      // A mirror's `replaces`: that node's parents move to the target in the same change.
      if (replace) await this.moveParents(this.lookup(replace.from), this.lookup(replace.to));
    });
  }

  /**
   * object-add: an object nodes refer to by id (ObjectRegistry.add), under the graph lock
   * so that no node is being opened meanwhile.
   */
  async addObject(options: unknown, how: { syntax?: OptionSyntax } = {}): Promise<void> {
    this.checkOpen();
    await this.lock.write(() => this.objects.add(options, how.syntax ?? 'json'));
  }

  /** object-del: refused while nodes use the object. */
  async delObject(id: string): Promise<void> {
    await this.lock.write(() => this.objects.del(id));
  }

  /** The objects, as query-objects would show them. */
  queryObjects(): ObjectInfo[] {
    return this.objects.list();
  }

  /**
   * Closes every backend and node. A node failing to close (a qcow2 writing its metadata
   * back) does not keep the others open: they are all closed, then the first error thrown.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    let first: unknown;
    for (const b of [...this.backends]) await b.close().catch((e: unknown) => (first ??= e));
    await this.lock.write(async () => {
      this.closed = true;
      for (;;) {
        const top = [...this.nodes.values()].find((n) => n.parents.size === 0 && n.ownedByUser);
        if (!top) break;
        top.ownedByUser = false;
        await this.unref(top).catch((e: unknown) => (first ??= e));
      }
    });
    if (first !== undefined) throw first;
  }

  // ---------------------------------------------------------------- internals

  private checkOpen(): void {
    if (this.closed) throw new BlockError(BlockErrorCode.CLOSED, 'the graph is closed');
  }
}
