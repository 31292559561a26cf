// BlockNode (QEMU's BlockDriverState) with its edges (ChildEdge: the BdrvChild drivers
// see): its children and parents, references, permissions, the driver instance and its
// limits. BlockNode is the ChildNode of driver.ts; its generic I/O layer is node-read.ts
// and node-write.ts, and the helpers they share io-request.ts.
//
// Requests reach a node through read/write/writeZeroes/discard/flush/blockStatus, always
// under the graph's read lock (taken by the BlockBackend). What the driver instances are
// guaranteed is documented in driver.ts.

import type { BdrvChild, ChildNode, DriverInstance } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';
import { NodeDirty } from './node-dirty.ts';
import type { NodeSettings } from './node-settings.ts';
import type { ChildRole } from './permissions.ts';
import { BLK_PERM_ALL } from './permissions.ts';
import { type RangeHold, RangeLock } from './range-lock.ts';

export type { SparsePiece } from './node-read.ts';
export type { NodeSettings } from './node-settings.ts';

/** Who holds an edge: a node or a backend (by name). */
export interface ChildParent {
  readonly name: string;
  readonly isBackend: boolean;
  /** A block job's hold on a node (QEMU's child_job), not a user of it (a BlockBackend). */
  readonly jobChild?: boolean;
}

/** An edge from a parent to a child node, with the permissions taken and shared. */
export class ChildEdge implements BdrvChild {
  /** Permissions this parent takes on the node (BLK_PERM_* bits). */
  perm = 0;
  /** Permissions this parent lets others take. */
  shared = BLK_PERM_ALL;

  /** The child's name in its parent ('file', 'backing', 'root'). */
  readonly name: string;
  readonly roles: readonly ChildRole[];
  readonly parent: ChildParent;
  node: BlockNode;

  constructor(name: string, roles: readonly ChildRole[], parent: ChildParent, node: BlockNode) {
    this.name = name;
    this.roles = roles;
    this.parent = parent;
    this.node = node;
  }
}

/** The services a node needs from its graph. */
export interface NodeHost {
  allocBuffer(length: number): Uint8Array;
  releaseBuffer(buf: Uint8Array): void;
  /** An event of a node (BLOCK_WRITE_THRESHOLD), for the graph's user. */
  nodeEvent(event: GraphEvent): void;
}

/** An event of the graph, with QEMU's name and data (a QMP event to the daemon). */
export interface GraphEvent {
  event: 'BLOCK_WRITE_THRESHOLD';
  data: { 'node-name': string; 'amount-exceeded': number; 'write-threshold': number };
}

export class BlockNode extends NodeDirty implements ChildParent, ChildNode {
  readonly isBackend = false;
  /** Edges to children, by child name. */
  readonly children = new Map<string, ChildEdge>();
  /** Edges from parents (nodes and backends). */
  readonly parents = new Set<ChildEdge>();
  /** References: one per parent edge, one for the graph's user if it added the node by name. */
  refcount = 0;
  /** Added by the graph's user (blockdev-add) rather than inline: may be removed by name. */
  ownedByUser = false;
  /** Cumulative permissions of the parents (computed by the graph). */
  perm = 0;
  shared = BLK_PERM_ALL;
  instance!: DriverInstance;
  align = 1;
  maxTransfer = Number.MAX_SAFE_INTEGER;
  closed = false;
  /** A filter a job inserted without a filter-node-name (QEMU's bs->implicit). */
  implicit = false;
  /** The parent that opened it inline (QEMU's inherits_from): blockdev-reopen reopens it too. */
  inheritsFrom: BlockNode | undefined;
  /** Ids of the graph objects this node uses (released when it closes). */
  readonly objects: string[] = [];

  readonly name: string;
  readonly driver: string;
  readonly settings: NodeSettings;
  /** The options it was added (or last reopened) with. */
  options: Readonly<Record<string, unknown>>;
  private readonly host: NodeHost;

  constructor(
    name: string,
    driver: string,
    settings: NodeSettings,
    options: Readonly<Record<string, unknown>>,
    host: NodeHost,
  ) {
    super();
    this.name = name;
    this.driver = driver;
    this.settings = settings;
    this.options = options;
    this.host = host;
  }

  get readOnly(): boolean {
    return this.settings.readOnly;
  }

  get filename(): string | undefined {
    const f = this.driver === 'file' ? this.options.filename : undefined;
    return typeof f === 'string' ? f : undefined;
  }

  /** Called by the graph once the driver is open. */
  setInstance(instance: DriverInstance): void {
    this.instance = instance;
    const align = instance.limits?.requestAlignment ?? 1;
    if (!Number.isSafeInteger(align) || align < 1 || (align & (align - 1)) !== 0) {
      throw new BlockError(
        BlockErrorCode.BAD_OPTION,
        `node '${this.name}': bad request alignment ${align}`,
      );
    }
    this.align = align;
    const max = instance.limits?.maxTransfer;
    if (max !== undefined) this.maxTransfer = Math.max(align, max - (max % align));
    if (align > 1) this.tracker = new RangeLock();
  }

  /** Serialise overlapping writes on this node (copy-on-read needs it on its child). */
  enableTracking(): void {
    this.tracker ??= new RangeLock();
  }

  /**
   * Takes [start, end) of this node exclusively (waits for overlapping writes and
   * serialising operations; writes wait for it): for read-then-write operations such as
   * copy-on-read. Pass the hold as `owner` to the writes it makes; release it after.
   */
  serialise(start: number, end: number): Promise<RangeHold> {
    this.enableTracking();
    return this.tracker!.serialise(start, end);
  }

  release(hold: RangeHold): void {
    this.tracker!.release(hold);
  }

  get isFormat(): boolean {
    return this.instance.kind === 'format';
  }

  /** bdrv_get_info's cluster size: the format's (through filters), else undefined. */
  clusterSize(): number | undefined {
    const cs = this.instance.info?.()['cluster-size'];
    if (typeof cs === 'number') return cs;
    return this.instance.kind === 'filter' ? this.primary?.node.clusterSize() : undefined;
  }

  /** The backing (cow) child, if any. */
  get backing(): ChildEdge | undefined {
    for (const c of this.children.values()) if (c.roles.includes('cow')) return c;
    return undefined;
  }

  /** The child data is filtered to, or the primary child. */
  get primary(): ChildEdge | undefined {
    for (const c of this.children.values()) if (c.roles.includes('primary')) return c;
    return undefined;
  }

  size(): number {
    return this.instance.size();
  }

  allocBuffer(length: number): Uint8Array {
    return this.host.allocBuffer(length);
  }

  protected override writeThresholdExceeded(amountExceeded: number, threshold: number): void {
    this.host.nodeEvent({
      event: 'BLOCK_WRITE_THRESHOLD',
      data: {
        'node-name': this.name,
        'amount-exceeded': amountExceeded,
        'write-threshold': threshold,
      },
    });
  }

  releaseBuffer(buf: Uint8Array): void {
    this.host.releaseBuffer(buf);
  }
}
