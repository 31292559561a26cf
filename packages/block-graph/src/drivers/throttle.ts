// The `throttle` filter: I/O limits (iops and bytes per second for reads, writes and in
// total, each with a burst) by QEMU's leaky buckets. A request that would go over a limit
// waits on a timer, never blocking the event loop; requests of one direction leave in
// order. Writes, write-zeroes and discards count as writes; flushes and block status pass.
// When the graph drains, queued requests go at once (as QEMU's throttle does).

import {
  type BdrvChild,
  defineDriver,
  type FilterInstance,
  type FilterRequest,
} from '../driver.ts';
import { BlockOptionError } from '../errors.ts';
import { custom, int, type Optional, type OptionSyntax, opt, str, struct } from '../schema.ts';

const KINDS = ['total', 'read', 'write'] as const;
const UNITS = ['iops', 'bps'] as const;

/** The keys of `limits` (QEMU's throttle-group limits). */
export const THROTTLE_LIMIT_KEYS: readonly string[] = [
  ...UNITS.flatMap((u) =>
    KINDS.flatMap((k) => [`${u}-${k}`, `${u}-${k}-max`, `${u}-${k}-max-length`]),
  ),
  'iops-size',
];

const limitMembers: Record<string, Optional<number, undefined>> = Object.fromEntries(
  THROTTLE_LIMIT_KEYS.map((k) => [k, opt(int({ min: 0 }))]),
);
const limitsStruct = struct(limitMembers);

class Bucket {
  level = 0;
  burstLevel = 0;
  private last = performance.now();

  readonly avg: number;
  readonly max: number;
  readonly burstLength: number;

  constructor(avg: number, max: number, burstLength: number) {
    this.avg = avg;
    this.max = max;
    this.burstLength = burstLength;
  }

  private leak(now: number): void {
    const dt = (now - this.last) / 1000;
    this.last = now;
    this.level = Math.max(this.level - this.avg * dt, 0);
    if (this.burstLength > 1) this.burstLevel = Math.max(this.burstLevel - this.max * dt, 0);
  }

  /** Milliseconds to wait before a request may go (0: now). */
  wait(now: number): number {
    this.leak(now);
    const size = this.max ? this.max * this.burstLength : this.avg / 10;
    const extra = this.level - size;
    if (extra > 0) return (extra / this.avg) * 1000;
    if (this.burstLength > 1) {
      const burstExtra = this.burstLevel - this.max / 10;
      if (burstExtra > 0) return (burstExtra / this.max) * 1000;
    }
    return 0;
  }

  account(units: number): void {
    this.level += units;
    if (this.burstLength > 1) this.burstLevel += units;
  }
}

interface Waiter {
  bytes: number;
  go: () => void;
}

class Direction {
  readonly queue: Waiter[] = [];
  timer: NodeJS.Timeout | undefined;

  readonly buckets: { bucket: Bucket; unit: 'iops' | 'bps' }[];
  readonly iopsSize: number;

  constructor(buckets: { bucket: Bucket; unit: 'iops' | 'bps' }[], iopsSize: number) {
    this.buckets = buckets;
    this.iopsSize = iopsSize;
  }

  private units(unit: 'iops' | 'bps', bytes: number): number {
    if (unit === 'bps') return bytes;
    return this.iopsSize && bytes > this.iopsSize ? bytes / this.iopsSize : 1;
  }

  wait(now: number): number {
    let w = 0;
    for (const b of this.buckets) w = Math.max(w, b.bucket.wait(now));
    return w;
  }

  account(bytes: number): void {
    for (const b of this.buckets) b.bucket.account(this.units(b.unit, bytes));
  }

  /** Lets the head of the queue go while the limits allow, then arms a timer. */
  pump(): void {
    this.timer = undefined;
    while (this.queue.length > 0) {
      const w = this.wait(performance.now());
      if (w > 0) {
        this.timer = setTimeout(() => this.pump(), Math.ceil(w));
        return;
      }
      const head = this.queue.shift()!;
      this.account(head.bytes);
      head.go();
    }
  }

  flushAll(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    for (const w of this.queue.splice(0)) {
      this.account(w.bytes);
      w.go();
    }
  }
}

/**
 * The buckets and queues of a set of limits: one per throttle node, or one shared by the
 * nodes of a throttle group (an object of the graph: BlockGraph.addObject).
 */
export class ThrottleGroup {
  private reads!: Direction;
  private writes!: Direction;
  limits!: Readonly<Partial<Record<string, number>>>;

  constructor(limits: Partial<Record<string, number>>) {
    this.setLimits(limits);
  }

  /**
   * New limits for the group's nodes (QOM's qom-set of a throttle-group's limits): what
   * waits under the old ones goes now, the new buckets count from here.
   */
  setLimits(limits: Partial<Record<string, number>>): void {
    if (this.reads) this.release();
    this.limits = limits;
    const bucket = (unit: 'iops' | 'bps', kind: string) => {
      const avg = limits[`${unit}-${kind}`] ?? 0;
      if (!avg) return [];
      const max = limits[`${unit}-${kind}-max`] ?? 0;
      const len = limits[`${unit}-${kind}-max-length`] ?? 1;
      return [{ bucket: new Bucket(avg, max, len), unit }];
    };
    const total = [...bucket('iops', 'total'), ...bucket('bps', 'total')];
    const size = limits['iops-size'] ?? 0;
    this.reads = new Direction(
      [...total, ...bucket('iops', 'read'), ...bucket('bps', 'read')],
      size,
    );
    this.writes = new Direction(
      [...total, ...bucket('iops', 'write'), ...bucket('bps', 'write')],
      size,
    );
  }

  /** Resolves when a request of `bytes` may go (undefined: at once). */
  admit(write: boolean, bytes: number): Promise<void> | undefined {
    const dir = write ? this.writes : this.reads;
    if (dir.buckets.length === 0) return undefined;
    if (dir.queue.length === 0 && dir.wait(performance.now()) === 0) {
      dir.account(bytes);
      return undefined;
    }
    return new Promise<void>((go) => {
      dir.queue.push({ bytes, go });
      if (!dir.timer) dir.pump();
    });
  }

  /** Lets every queued request go now (drained sections, close). */
  release(): void {
    this.reads.flushAll();
    this.writes.flushAll();
  }
}

class ThrottleInstance implements FilterInstance {
  readonly kind = 'filter';
  readonly child: BdrvChild;
  private readonly group: ThrottleGroup;
  private readonly groupName: string | undefined;

  constructor(child: BdrvChild, group: ThrottleGroup, groupName: string | undefined) {
    this.child = child;
    this.group = group;
    this.groupName = groupName;
  }

  size(): number {
    return this.child.node.size();
  }

  intercept(req: FilterRequest): Promise<void> | undefined {
    if (req.op === 'flush' || req.op === 'block-status') return undefined;
    return this.group.admit(req.op !== 'read', req.length);
  }

  drainBegin(): void {
    this.group.release();
  }

  async close(): Promise<void> {
    this.group.release();
  }

  info(): Record<string, unknown> {
    return {
      limits: { ...this.group.limits },
      ...(this.groupName ? { 'throttle-group': this.groupName } : {}),
    };
  }
}

function parseLimits(
  value: unknown,
  key: string,
  syntax: OptionSyntax,
): Partial<Record<string, number>> {
  return validateThrottleLimits(limitsStruct.parse(value, key, syntax), key);
}

/** Checks a set of limits together (the object's, or a throttle node's `limits` at `key`). */
export function validateThrottleLimits<L extends Partial<Record<string, number>>>(
  v: L,
  key: string,
): L {
  for (const u of UNITS) {
    const name = (k: string) => `${u}-${k}`;
    if (
      (v[name('total')] ?? 0) !== 0 &&
      ((v[name('read')] ?? 0) !== 0 || (v[name('write')] ?? 0) !== 0)
    ) {
      throw new BlockOptionError(
        `${key}.${name('total')}`,
        `cannot be combined with ${name('read')} or ${name('write')}`,
      );
    }
    for (const k of KINDS) {
      const max = v[`${name(k)}-max`] ?? 0;
      const avg = v[name(k)] ?? 0;
      if (max && !avg) throw new BlockOptionError(`${key}.${name(k)}-max`, `needs ${name(k)}`);
      if (max && max < avg)
        throw new BlockOptionError(`${key}.${name(k)}-max`, `is less than ${name(k)}`);
      const len = v[`${name(k)}-max-length`];
      if (len !== undefined && len < 1)
        throw new BlockOptionError(`${key}.${name(k)}-max-length`, 'must be at least 1');
      if (len !== undefined && len > 1 && !max) {
        throw new BlockOptionError(`${key}.${name(k)}-max-length`, `needs ${name(k)}-max`);
      }
    }
  }
  return v;
}

/** QEMU's ThrottleLimits, checked. */
export const throttleLimits = custom('ThrottleLimits', parseLimits);

export const throttleDriver = defineDriver({
  name: 'throttle',
  options: {
    /** A throttle-group object of the graph (QEMU's way): its limits are shared. */
    'throttle-group': opt(str),
    /** Limits of this node alone. */
    limits: opt(throttleLimits),
  },
  children: [{ key: 'file', required: true, roles: () => ['filtered', 'primary'] }],
  validate(o) {
    if ((o['throttle-group'] === undefined) === (o.limits === undefined)) {
      throw new BlockOptionError('throttle-group', 'give either throttle-group or limits');
    }
  },
  async open(ctx) {
    const { 'throttle-group': name, limits } = ctx.options;
    let group: ThrottleGroup;
    if (name === undefined) {
      group = new ThrottleGroup(limits ?? {});
    } else {
      try {
        const value = ctx.object('throttle-group', name, 'throttle-group');
        if (!(value instanceof ThrottleGroup))
          throw new BlockOptionError('throttle-group', 'not a group');
        group = value;
      } catch (e) {
        if (!(e instanceof BlockOptionError)) throw e;
        throw new BlockOptionError(
          e.key,
          'no such group',
          `Throttle group '${name}' does not exist`,
        );
      }
    }
    return new ThrottleInstance(ctx.children.file!, group, name);
  },
});
