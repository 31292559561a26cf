// blockdev-reopen (QEMU's bdrv_reopen_multiple): new options for nodes that are open, as
// one transaction. Each node given is queued with the children it opened inline (they
// inherit the new read-only and cache settings, QEMU's inherits_from); the options are
// checked (only changeable ones may differ); the new settings are applied and the
// permissions checked with them (the file driver's image locks included); then the
// instances whose state depends on them are opened again. A refusal changes nothing.
//
// Order matters where an instance is opened again: a format going read-only writes its
// metadata back while its file is still writable (before anything else), one going
// read-write opens after its file did (children first).

import type { OpenContext } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import { GraphOpener, inheritedSettings, nodeSettings } from './graph-open.ts';
import { frozenChild } from './jobs/op-blockers.ts';
import { type BlockNode, ChildEdge, type NodeSettings } from './node.ts';
import type { ObjectType } from './objects.ts';
import { checkOptions, type NodeSpec } from './options.ts';

/** One node of a reopen: its new options and settings. */
interface Entry {
  node: BlockNode;
  spec: NodeSpec;
  settings: NodeSettings;
  old: NodeSettings;
  /** The instance is opened again (its driver's state depends on what changes). */
  reinstantiate: boolean;
  /** Opened again already (in the prepare step). */
  done: boolean;
  /** Children pointed at other nodes ('backing' and 'file', as QEMU 7.2 allows). */
  links: LinkChange[];
}

/** A child link a reopen changes: `edge` (if the node has that child) goes to `to`. */
interface LinkChange {
  key: string;
  edge: ChildEdge | undefined;
  /** The new child; undefined drops it ('backing': null). */
  to: BlockNode | undefined;
  /** The child it had. */
  from: BlockNode | undefined;
}

function cannotChange(key: string): BlockError {
  // QEMU's wording (bdrv_reopen_prepare).
  return new BlockError(BlockErrorCode.BAD_OPTION, `Cannot change the option '${key}'`);
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export class GraphReopener extends GraphOpener {
  /**
   * Reopens the nodes `list` names (blockdev-add-shaped options with node-name each), as
   * one change; the caller holds the graph's write lock (drained).
   */
  protected async reopenQueue(list: readonly unknown[], prefix = 'options'): Promise<void> {
    const queue = new Map<BlockNode, Entry>();
    for (const [i, raw] of list.entries()) {
      const spec = checkOptions(raw, this.drivers, `${prefix}[${i}].`);
      if (spec.nodeName === undefined) {
        throw new BlockError(BlockErrorCode.BAD_OPTION, 'node-name not specified');
      }
      const node = this.nodes.get(spec.nodeName);
      if (!node) {
        throw new BlockError(
          BlockErrorCode.NODE_NOT_FOUND,
          `Failed to find node with node-name='${spec.nodeName}'`,
        );
      }
      if (queue.has(node)) {
        throw new BlockError(
          BlockErrorCode.BAD_OPTION,
          `Node '${node.name}' is given more than once`,
        );
      }
      this.queueNode(queue, node, spec, undefined);
    }
    const entries = [...queue.values()];
    if (entries.length === 0) return;
    // Prepare: formats going read-only write their metadata back and open read-only.
    for (const e of entries) {
      if (e.reinstantiate && e.settings.readOnly && !e.old.readOnly && e.node.isFormat) {
        await this.reinstantiate(e.node, e.spec, e.settings);
        e.done = true;
      }
    }
    for (const e of entries) Object.assign(e.node.settings, e.settings);
    const links = entries.flatMap((e) => e.links.map((l) => ({ node: e.node, ...l })));
    const undoLinks = links.map((l) => this.relink(l.node, l.key, l.edge, l.to));
    try {
      this.refreshPermissions();
    } catch (err) {
      for (const undo of undoLinks.toReversed()) undo();
      for (const e of entries) Object.assign(e.node.settings, e.old);
      this.refreshPermissions();
      for (const e of entries.toReversed()) {
        if (e.done) await this.reinstantiate(e.node, this.currentSpec(e.node), e.old);
      }
      const name = (err as { node?: unknown }).node;
      const was = [...queue.keys()].find((n) => n.name === name);
      if (was && !queue.get(was)!.old.readOnly) {
        // QEMU's wording for a node writable until this reopen (bdrv_node_refresh_perm).
        throw new BlockError(
          BlockErrorCode.PERMISSION_CONFLICT,
          `Read-only block node '${was.name}' cannot support read-write users`,
          { cause: err },
        );
      }
      throw err;
    }
    // Commit: what goes read-only parents first, then the rest children first.
    const going = entries.filter((e) => e.reinstantiate && !e.done);
    for (const e of going.filter((x) => x.settings.readOnly))
      await this.reinstantiate(e.node, e.spec, e.settings);
    for (const e of going.filter((x) => !x.settings.readOnly).toReversed()) {
      await this.reinstantiate(e.node, e.spec, e.settings);
    }
    for (const e of entries) e.node.options = e.spec.raw;
    for (const l of links) {
      const edge = l.node.children.get(l.key);
      if (edge) this.backingChanged(edge);
      else if (l.node.instance.kind === 'format') l.node.instance.backingChanged?.(undefined);
      if (l.to) l.to.refcount++;
      if (l.from) await this.unref(l.from);
    }
    this.refreshPermissions(); // the new instances take what their parents hold (image locks)
  }

  /**
   * QEMU's checks for pointing `node`'s child `key` at the node named `given` (or, for
   * 'backing', at none: null), in bdrv_reopen_parse_file_or_backing's order and words;
   * undefined when nothing changes.
   */
  private linkChange(node: BlockNode, key: string, given: string | null): LinkChange | undefined {
    let to: BlockNode | undefined;
    if (given !== null) {
      to = this.nodes.get(given);
      if (!to) {
        throw new BlockError(
          BlockErrorCode.NODE_NOT_FOUND,
          `Cannot find device='' nor node-name='${given}'`,
        );
      }
      if (to === node || this.descendants(to).has(node)) {
        throw new BlockError(
          BlockErrorCode.BAD_GRAPH_CHANGE,
          `Making '${given}' a ${key} child of '${node.name}' would create a cycle`,
        );
      }
    }
    const edge = node.children.get(key);
    const old = edge?.node;
    if (old === to) return undefined;
    if (old) {
      let below: BlockNode | undefined = old;
      while (below?.implicit) below = below.primary?.node ?? below.backing?.node;
      if (below === to) return undefined;
      if (old.implicit) {
        throw new BlockError(
          BlockErrorCode.BAD_GRAPH_CHANGE,
          `Cannot replace implicit ${key} child of ${node.name}`,
        );
      }
    }
    if (node.instance.kind === 'filter' && !old) {
      throw new BlockError(
        BlockErrorCode.BAD_GRAPH_CHANGE,
        `'${node.name}' is a ${node.driver} filter node that does not support a ${key} child`,
      );
    }
    const frozen = key === 'backing' ? frozenChild(this, node.name) : undefined;
    if (edge && frozen !== undefined) {
      throw new BlockError(
        BlockErrorCode.NODE_BUSY,
        `Cannot change frozen '${edge.name}' link from '${node.name}' to '${old!.name}'`,
      );
    }
    if (key === 'file' && !edge) {
      throw new BlockError(
        BlockErrorCode.BAD_GRAPH_CHANGE,
        'Cannot set file child to format node without file child',
      );
    }
    return { key, edge, to, from: old };
  }

  /** Points `node`'s child `key` at `to` (or drops it); returns the undo. */
  private relink(
    node: BlockNode,
    key: string,
    edge: ChildEdge | undefined,
    to: BlockNode | undefined,
  ): () => void {
    if (edge && to) {
      const old = edge.node;
      this.repoint(edge, to);
      return () => this.repoint(edge, old);
    }
    if (edge) {
      this.unlink(edge);
      node.children.delete(key);
      return () => {
        this.link(edge);
        node.children.set(key, edge);
      };
    }
    const added = new ChildEdge(key, ['cow'], node, to!);
    this.link(added);
    node.children.set(key, added);
    return () => {
      this.unlink(added);
      node.children.delete(key);
    };
  }

  /** A node's current options, checked (to open it again as it is). */
  private currentSpec(node: BlockNode): NodeSpec {
    return checkOptions(node.options, this.drivers);
  }

  /** Queues `node` with new options `spec`, and the children it opened inline. */
  private queueNode(
    queue: Map<BlockNode, Entry>,
    node: BlockNode,
    spec: NodeSpec,
    inherited: Partial<NodeSettings> | undefined,
  ): void {
    if (spec.driver.name !== node.driver) throw cannotChange('driver');
    const settings = nodeSettings(spec, inherited);
    if (settings.forceShare !== node.settings.forceShare) throw cannotChange('force-share');
    const reopenable = spec.driver.reopen?.options ?? [];
    const old = this.currentSpec(node).options;
    let optionsChanged = false;
    for (const [k, v] of Object.entries(spec.options)) {
      if (same(v, old[k])) continue;
      if (!reopenable.includes(k)) throw cannotChange(k);
      optionsChanged = true;
    }
    for (const k of Object.keys(old)) {
      if (!(k in spec.options) && reopenable.includes(k)) optionsChanged = true;
    }
    const modeChanged =
      settings.readOnly !== node.settings.readOnly || settings.direct !== node.settings.direct;
    queue.set(node, {
      node,
      spec,
      settings,
      old: { ...node.settings },
      reinstantiate: optionsChanged || (modeChanged && spec.driver.reopen?.instance === true),
      done: false,
      links: [],
    });
    const headerBacking = node.instance.info?.()['backing-filename'];
    if (
      !('backing' in spec.children) &&
      (node.backing !== undefined || (typeof headerBacking === 'string' && headerBacking !== ''))
    ) {
      // QEMU's wording (bdrv_reopen_prepare): a backing child, or the one the image names,
      // must be given again (null drops it).
      throw new BlockError(BlockErrorCode.BAD_OPTION, `backing is missing for '${node.name}'`);
    }
    const links = queue.get(node)!.links;
    for (const key of ['backing', 'file']) {
      const given = spec.children[key];
      if (given === null || typeof given === 'string') {
        const change = this.linkChange(node, key, given);
        if (change) links.push(change);
      }
    }
    for (const edge of node.children.values()) {
      const given = spec.children[edge.name];
      const child = edge.node;
      const inline = typeof given === 'object' && given !== null ? given : undefined;
      const sameChild =
        given === child.name ||
        (inline !== undefined && (inline.nodeName ?? child.name) === child.name);
      const relinked = (edge.name === 'backing' || edge.name === 'file') && inline === undefined;
      if (given !== undefined && !sameChild) {
        if (relinked) continue; // a node name or null: linkChange's
        throw cannotChange(edge.name);
      }
      if (child.inheritsFrom !== node || queue.has(child)) continue;
      const cow = edge.roles.includes('cow');
      // A child kept by name keeps what its parent's options do not set (QEMU's
      // keep_old_opts); one given inline starts from what it inherits.
      const old = child.settings;
      const inherit = inline
        ? inheritedSettings(settings, cow)
        : {
            readOnly: cow ? true : (spec.readOnly ?? old.readOnly),
            direct: spec.direct ?? old.direct,
            noFlush: spec.noFlush ?? old.noFlush,
            discard: old.discard,
            autoReadOnly: spec.autoReadOnly ?? old.autoReadOnly,
            forceShare: old.forceShare,
          };
      this.queueNode(queue, child, inline ?? this.currentSpec(child), inherit);
    }
  }

  /**
   * Opens a node's instance again with new options and settings over the children it
   * has (QEMU reopens in place; a new instance is this project's way to the same state).
   * Persistent dirty bitmaps go to the image first and keep their objects.
   */
  private async reinstantiate(
    node: BlockNode,
    spec: NodeSpec,
    settings: NodeSettings,
  ): Promise<void> {
    const old = node.instance;
    const format = node.isFormat;
    if (!node.readOnly) await node.storePersistentBitmaps();
    // A format's metadata is cached in its instance: only one may be open on the file.
    if (format) await old.close?.();
    try {
      await this.openInstance(node, spec, settings);
    } catch (err) {
      // Back to the instance it had (a format was closed for this one).
      if (format) await this.openInstance(node, this.currentSpec(node), { ...node.settings });
      throw err;
    }
    if (!format) await old.close?.();
  }

  private async openInstance(
    node: BlockNode,
    spec: NodeSpec,
    settings: NodeSettings,
  ): Promise<void> {
    const children: Record<string, ChildEdge> = {};
    for (const [k, e] of node.children) children[k] = e;
    const nullChildren = new Set(
      (spec.driver.children ?? []).map((c) => c.key).filter((k) => !node.children.has(k)),
    );
    const next = { ...settings };
    const objects: string[] = [];
    const ctx: OpenContext = {
      nodeName: node.name,
      readOnly: next.readOnly,
      autoReadOnly: next.autoReadOnly,
      setReadOnly: () => {
        next.readOnly = true;
        node.settings.readOnly = true;
      },
      direct: next.direct,
      options: spec.options,
      children,
      nullChildren,
      engine: (backend) => this.engine(backend),
      configureSocket: this.configureSocket,
      inlineSeeks: this.inlineSeeks,
      object: (type, id, key, keep = true) => {
        if (!keep) return this.objects.get(type as ObjectType, id, key);
        const value = this.objects.use(type as ObjectType, id, key);
        objects.push(id);
        return value;
      },
      openChild: async (key) => {
        throw new BlockError(
          BlockErrorCode.BAD_OPTION,
          `node '${node.name}': child '${key}' cannot be opened on reopen`,
        );
      },
    };
    let instance: Awaited<ReturnType<typeof spec.driver.open>>;
    try {
      instance = await spec.driver.open(ctx);
    } catch (err) {
      for (const id of objects) this.objects.release(id);
      throw err;
    }
    this.releaseObjects(node);
    node.objects.push(...objects);
    node.setInstance(instance);
    const store = instance.persistentBitmaps;
    if (store) {
      for (const b of await store.load()) {
        const mine = node.dirtyBitmaps.find((x) => x.persistent && x.name === b.name);
        if (mine) mine.readOnly = b.readOnly;
        else node.dirtyBitmaps.push(b);
      }
    }
  }
}
