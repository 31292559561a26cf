// Opening nodes from checked options (QEMU's bdrv_open_inherit, bdrv_open_child): the
// settings children inherit, inline and referenced children, the backing-chain checks, the
// driver's OpenContext, and undoing everything on failure.

import {
  checkLoop,
  childChain,
  fileIdentity,
  type OpenChain,
  TOP_OF_CHAIN,
} from './backing-chain.ts';
import type { OpenContext } from './driver.ts';
import { BlockError, BlockErrorCode, BlockOptionError } from './errors.ts';
import { GraphNodes } from './graph-nodes.ts';
import { BlockNode, ChildEdge, type NodeSettings } from './node.ts';
import type { ObjectType } from './objects.ts';
import { checkOptions, type NodeSpec } from './options.ts';

/** A node's settings from its options and what it inherits from its parent (if inline). */
export function nodeSettings(
  spec: NodeSpec,
  inherited: Partial<NodeSettings> | undefined,
): NodeSettings {
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
  return settings;
}

/**
 * What an inline child inherits: cache, read-only and force-share; lower layers default
 * to discard=unmap (the policy is the top's); backing files default to read-only.
 */
export function inheritedSettings(settings: NodeSettings, cow: boolean): Partial<NodeSettings> {
  return {
    readOnly: cow ? true : settings.readOnly,
    direct: settings.direct,
    noFlush: settings.noFlush,
    discard: 'unmap',
    autoReadOnly: settings.autoReadOnly,
    forceShare: settings.forceShare,
  };
}

export class GraphOpener extends GraphNodes {
  private autoName = 0;

  protected checkNames(spec: NodeSpec, seen: Set<string>): void {
    if (spec.nodeName !== undefined) {
      if (this.nodes.has(spec.nodeName) || seen.has(spec.nodeName)) {
        throw Object.assign(
          new BlockError(
            BlockErrorCode.DUPLICATE_NODE,
            // QEMU's wording (bdrv_assign_node_name).
            `Duplicate nodes with node-name='${spec.nodeName}'`,
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

  protected newName(): string {
    let name: string;
    do name = `#block${String(++this.autoName).padStart(3, '0')}`;
    while (this.nodes.has(name));
    return name;
  }

  /**
   * Opens a node and its inline children; on failure nothing it created is left. `chain`:
   * where the node sits in the backing chain being opened (backing-chain.ts).
   */
  protected async open(
    spec: NodeSpec,
    inherited: Partial<NodeSettings> | undefined,
    chain: OpenChain = TOP_OF_CHAIN,
  ): Promise<BlockNode> {
    const filename = spec.driver.name === 'file' ? spec.options.filename : undefined;
    const fileId = typeof filename === 'string' ? await fileIdentity(filename) : undefined;
    if (typeof filename === 'string') checkLoop(chain, fileId, filename);
    const settings = nodeSettings(spec, inherited);
    const childSettings = (cow: boolean) => inheritedSettings(settings, cow);
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
          child.inheritsFrom = node;
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
        configureSocket: this.configureSocket,
        inlineSeeks: this.inlineSeeks,
        object: (type, id, key, keep = true) => {
          if (!keep) return this.objects.get(type as ObjectType, id, `${spec.path}${key}`);
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
          child.inheritsFrom = node;
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
        await node.loadPersistentBitmaps();
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
  protected storageFiles(node: BlockNode, out = new Set<string>()): Set<string> {
    const id = this.fileIds.get(node);
    if (id !== undefined) out.add(id);
    for (const e of node.children.values()) {
      if (!e.roles.includes('cow')) this.storageFiles(e.node, out);
    }
    return out;
  }
}
