// BlockGraph: named nodes created from blockdev-add-shaped options, edges (ChildEdge) with
// roles and permissions, refcounting, the graph lock, and the graph changes (add, delete,
// replace a child, replace a node), each done under the write side of the lock.

import { type BackendHost, type BackendOptions, BlockBackend } from './backend.ts';
import {
  checkLoop,
  childChain,
  DEFAULT_MAX_BACKING_DEPTH,
  fileIdentity,
  type OpenChain,
  TOP_OF_CHAIN,
} from './backing-chain.ts';
import type { BlockDriver, ChildNode, EngineLike, OpenContext } from './driver.ts';
import { builtinDrivers } from './drivers/index.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import { GraphLock } from './graph-lock.ts';
import { refreshPermissions } from './graph-permissions.ts';
import { checkLinkNotFrozen, checkNotBusy } from './jobs/op-blockers.ts';
import { BlockNode, ChildEdge, type NodeSettings } from './node.ts';
import { type ObjectInfo, ObjectRegistry, type ObjectType } from './objects.ts';
import { checkOptions, type NodeSpec, type OptionSyntax } from './options.ts';
import { type PermissionName, permNames } from './permissions.ts';

type EngineBackend = 'io_uring' | 'aio' | 'threadpool' | 'auto';

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
}

export class BlockGraph implements BackendHost {
  /** The graph lock: requests hold the read side, graph changes the write side. */
  readonly lock = new GraphLock();
  private readonly nodes = new Map<string, BlockNode>();
  private readonly backends = new Set<BlockBackend>();
  private readonly drivers = new Map<string, BlockDriver>();
  private readonly engines = new Map<string, Promise<EngineLike>>();
  private bufferEngine: EngineLike | undefined;
  private readonly arena = new WeakSet<Uint8Array>();
  /** The objects (--object, object-add) drivers use: throttle groups, TLS credentials. */
  readonly objects: ObjectRegistry;
  private autoName = 0;
  private backendSeq = 0;
  private closed = false;
  private readonly maxBackingDepth: number;
  /** The identity (dev:ino) of each open file node, to find backing chains that loop. */
  private readonly fileIds = new WeakMap<BlockNode, string>();

  constructor(options: BlockGraphOptions = {}) {
    this.maxBackingDepth = options.maxBackingDepth ?? DEFAULT_MAX_BACKING_DEPTH;
    this.objects = options.objects ?? new ObjectRegistry();
    if (!Number.isSafeInteger(this.maxBackingDepth) || this.maxBackingDepth < 0) {
      throw new BlockOptionError('maxBackingDepth', 'expected a non-negative integer');
    }
    for (const d of builtinDrivers) this.drivers.set(d.name, d);
    for (const d of options.drivers ?? []) this.drivers.set(d.name, d);
    this.lock.onDrainBegin = () => {
      for (const n of this.nodes.values()) if (n.instance) n.instance.drainBegin?.();
    };
  }

  /** Makes a driver known to this graph (replacing one of the same name). */
  registerDriver(driver: BlockDriver): void {
    this.drivers.set(driver.name, driver);
  }

  /** The names of the drivers known. */
  driverNames(): string[] {
    return [...this.drivers.keys()];
  }

  // ---------------------------------------------------------------- buffers and engines

  /** A buffer for I/O: page-aligned engine arena memory once an engine is in use. */
  allocBuffer(length: number): Buffer {
    const engine = this.bufferEngine;
    if (!engine || length === 0) return Buffer.allocUnsafe(length);
    const buf = engine.allocBuffer(length);
    this.arena.add(buf);
    return buf;
  }

  releaseBuffer(buf: Uint8Array): void {
    if (this.bufferEngine && this.arena.has(buf)) {
      this.arena.delete(buf);
      this.bufferEngine.releaseBuffer(buf as Buffer);
    }
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

  // ---------------------------------------------------------------- lookups and queries

  /** The node of that name: its I/O and facts (what a driver sees of a child). */
  node(name: string): ChildNode {
    return this.lookup(name);
  }

  private lookup(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) throw new BlockError(BlockErrorCode.NODE_NOT_FOUND, `no node named '${name}'`);
    return n;
  }

  hasNode(name: string): boolean {
    return this.nodes.has(name);
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
        ...(n.instance?.info?.() ?? {}),
      };
      return info;
    });
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

  /** blockdev-del: removes a node added by name, refused while it has parents. */
  async del(name: string): Promise<void> {
    await this.lock.write(async () => {
      const node = this.lookup(name);
      checkNotBusy(this, name);
      if (!node.ownedByUser) {
        throw new BlockError(
          BlockErrorCode.NODE_IN_USE,
          `node '${name}' was created inline by its parent and goes with it`,
        );
      }
      if (node.parents.size > 0) {
        const users = [...node.parents]
          .map((c) => `'${c.parent.name}' (as '${c.name}')`)
          .join(', ');
        throw new BlockError(BlockErrorCode.NODE_IN_USE, `node '${name}' is in use by ${users}`);
      }
      node.ownedByUser = false;
      await this.unref(node);
      this.refreshPermissions();
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

  /** @internal: detaches a backend (BlockBackend.close). */
  async detachBackend(backend: BlockBackend, edge: ChildEdge): Promise<void> {
    await this.lock.write(async () => {
      this.backends.delete(backend);
      backend.attach(undefined);
      this.unlink(edge);
      await this.unref(edge.node);
      this.refreshPermissions();
    });
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
    await this.lock.write(async () => {
      const from = this.lookup(fromName);
      const to = this.lookup(toName);
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
      to.refcount += moved.length;
      from.refcount -= moved.length - 1;
      await this.unref(from);
      this.refreshPermissions();
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

  /** Closes every backend and node. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const b of [...this.backends]) await b.close();
    await this.lock.write(async () => {
      this.closed = true;
      for (;;) {
        const top = [...this.nodes.values()].find((n) => n.parents.size === 0 && n.ownedByUser);
        if (!top) break;
        top.ownedByUser = false;
        await this.unref(top);
      }
    });
  }

  // ---------------------------------------------------------------- internals

  private checkOpen(): void {
    if (this.closed) throw new BlockError(BlockErrorCode.CLOSED, 'the graph is closed');
  }

  private checkNames(spec: NodeSpec, seen: Set<string>): void {
    if (spec.nodeName !== undefined) {
      if (this.nodes.has(spec.nodeName) || seen.has(spec.nodeName)) {
        throw Object.assign(
          new BlockError(
            BlockErrorCode.DUPLICATE_NODE,
            `Invalid option '${spec.path}node-name': a node named '${spec.nodeName}' exists already`,
          ),
          { key: `${spec.path}node-name` },
        );
      }
      seen.add(spec.nodeName);
    }
    for (const [k, c] of Object.entries(spec.children)) {
      if (typeof c === 'string') {
        if (!this.nodes.has(c)) {
          throw Object.assign(
            new BlockError(
              BlockErrorCode.NODE_NOT_FOUND,
              `Invalid option '${spec.path}${k}': no node named '${c}'`,
            ),
            { key: `${spec.path}${k}` },
          );
        }
      } else if (c) this.checkNames(c, seen);
    }
  }

  private newName(): string {
    let name: string;
    do name = `#block${String(++this.autoName).padStart(3, '0')}`;
    while (this.nodes.has(name));
    return name;
  }

  /**
   * Opens a node and its inline children; on failure nothing it created is left. `chain`:
   * where the node sits in the backing chain being opened (backing-chain.ts).
   */
  private async open(
    spec: NodeSpec,
    inherited: Partial<NodeSettings> | undefined,
    chain: OpenChain = TOP_OF_CHAIN,
  ): Promise<BlockNode> {
    const filename = spec.driver.name === 'file' ? spec.options.filename : undefined;
    const fileId = typeof filename === 'string' ? await fileIdentity(filename) : undefined;
    if (typeof filename === 'string') checkLoop(chain, fileId, filename);
    const settings: NodeSettings = {
      readOnly: spec.readOnly ?? inherited?.readOnly ?? false,
      direct: spec.direct ?? inherited?.direct ?? false,
      noFlush: spec.noFlush ?? inherited?.noFlush ?? false,
      discard: spec.discard ?? inherited?.discard ?? 'ignore',
      detectZeroes: spec.detectZeroes ?? 'off',
      autoReadOnly: spec.autoReadOnly ?? inherited?.autoReadOnly ?? false,
      forceShare: spec.forceShare ?? inherited?.forceShare ?? false,
    };
    if (settings.forceShare && !settings.readOnly) {
      throw new BlockOptionError(
        `${spec.path}force-share`,
        'force-share=on can only be used with read-only images',
      );
    }
    // Children inherit cache, read-only and force-share; lower layers default to
    // discard=unmap (the policy is the top's); backing files default to read-only.
    const childSettings = (cow: boolean): Partial<NodeSettings> => ({
      readOnly: cow ? true : settings.readOnly,
      direct: settings.direct,
      noFlush: settings.noFlush,
      discard: 'unmap',
      autoReadOnly: settings.autoReadOnly,
      forceShare: settings.forceShare,
    });
    const name = spec.nodeName ?? this.newName();
    const node = new BlockNode(name, spec.driver.name, settings, spec.raw, this);
    const edges: ChildEdge[] = [];
    const childSpecs = new Map((spec.driver.children ?? []).map((c) => [c.key, c]));
    try {
      for (const [key, c] of Object.entries(spec.children)) {
        if (c === null) continue;
        const cs = childSpecs.get(key)!;
        const roles = cs.roles(spec.options);
        let child: BlockNode;
        if (typeof c === 'string') {
          child = this.lookup(c);
        } else {
          const cow = roles.includes('cow');
          child = await this.open(
            c,
            childSettings(cow),
            childChain(chain, cow, c, this.maxBackingDepth),
          );
          child.refcount--; // the edge below takes the reference open() handed out
        }
        const edge = new ChildEdge(key, roles, node, child);
        this.link(edge);
        child.refcount++;
        edges.push(edge);
        node.children.set(key, edge);
      }
      // auto-read-only: a node whose storage could only be opened read-only is read-only.
      if (settings.autoReadOnly && !settings.readOnly) {
        for (const e of edges) {
          if (!e.roles.includes('cow') && e.roles.includes('data') && e.node.readOnly) {
            settings.readOnly = true;
          }
        }
      }
      this.nodes.set(name, node);
      this.refreshPermissions();
      const children: Record<string, ChildEdge | undefined> = {};
      for (const e of edges) children[e.name] = e;
      const ctx: OpenContext = {
        nodeName: name,
        readOnly: settings.readOnly,
        autoReadOnly: settings.autoReadOnly,
        setReadOnly: () => {
          settings.readOnly = true;
        },
        direct: settings.direct,
        options: spec.options,
        children,
        nullChildren: new Set(
          Object.entries(spec.children)
            .filter(([, c]) => c === null)
            .map(([k]) => k),
        ),
        engine: (backend) => this.engine(backend),
        object: (type, id, key) => {
          const value = this.objects.use(type as ObjectType, id, `${spec.path}${key}`);
          node.objects.push(id);
          return value;
        },
        openChild: async (key, options) => {
          const cs = childSpecs.get(key);
          if (!cs)
            throw new BlockOptionError(
              `${spec.path}${key}`,
              `driver '${spec.driver.name}' has no such child`,
            );
          if (key in spec.children || node.children.has(key)) {
            throw new BlockOptionError(`${spec.path}${key}`, 'was given in the options already');
          }
          const childSpec = checkOptions(options, this.drivers, `${spec.path}${key}.`);
          this.checkNames(childSpec, new Set());
          const roles = cs.roles(spec.options);
          const cow = roles.includes('cow');
          // The child comes from this node's own data (a header): this node's files join
          // the chain, so that the child opening one of them again is a loop.
          const below = childChain(
            chain,
            cow,
            childSpec,
            this.maxBackingDepth,
            this.storageFiles(node),
          );
          const child = await this.open(childSpec, childSettings(cow), below);
          const edge = new ChildEdge(key, roles, node, child);
          this.link(edge); // takes over the reference open() handed out
          edges.push(edge);
          node.children.set(key, edge);
          try {
            this.refreshPermissions();
          } catch (err) {
            this.unlink(edge);
            node.children.delete(key);
            edges.pop();
            await this.unref(child);
            throw err;
          }
          children[key] = edge;
          return edge;
        },
      };
      const instance = await spec.driver.open(ctx);
      try {
        node.setInstance(instance);
        // Again: auto-read-only may have made the node read-only, and the instance now
        // takes what its parents hold (the file driver's image locks).
        this.refreshPermissions();
      } catch (err) {
        await instance.close?.();
        throw err;
      }
      if (fileId !== undefined) this.fileIds.set(node, fileId);
      node.refcount++; // the caller's reference
      return node;
    } catch (err) {
      this.nodes.delete(name);
      this.releaseObjects(node);
      for (const e of edges) {
        this.unlink(e);
        node.children.delete(e.name);
        await this.unref(e.node);
      }
      this.refreshPermissions();
      if (err instanceof BlockOptionError && spec.path && !err.key.startsWith(spec.path)) {
        throw new BlockOptionError(
          `${spec.path}${err.key}`,
          err.message.replace(/^Invalid option '[^']*': /, ''),
        );
      }
      throw err;
    }
  }

  /** The files (dev:ino) a node stores its own data in: below it, not through backing edges. */
  private storageFiles(node: BlockNode, out = new Set<string>()): Set<string> {
    const id = this.fileIds.get(node);
    if (id !== undefined) out.add(id);
    for (const e of node.children.values()) {
      if (!e.roles.includes('cow')) this.storageFiles(e.node, out);
    }
    return out;
  }

  private releaseObjects(node: BlockNode): void {
    for (const id of node.objects.splice(0)) this.objects.release(id);
  }

  private link(edge: ChildEdge): void {
    edge.node.parents.add(edge);
  }

  private unlink(edge: ChildEdge): void {
    edge.node.parents.delete(edge);
  }

  private repoint(edge: ChildEdge, to: BlockNode): void {
    edge.node.parents.delete(edge);
    edge.node = to;
    to.parents.add(edge);
  }

  /** Drops a reference; the last one closes the node and drops its children's. */
  private async unref(node: BlockNode): Promise<void> {
    node.refcount--;
    if (node.refcount > 0 || node.closed) return;
    node.closed = true;
    this.nodes.delete(node.name);
    this.releaseObjects(node);
    try {
      await node.instance?.close?.();
    } finally {
      for (const e of [...node.children.values()]) {
        this.unlink(e);
        node.children.delete(e.name);
        await this.unref(e.node);
      }
    }
  }

  private descendants(node: BlockNode): Set<BlockNode> {
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
  private refreshPermissions(): void {
    refreshPermissions(this.nodes, this.backends, this.drivers);
  }
}
