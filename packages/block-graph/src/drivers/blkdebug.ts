// The `blkdebug` filter, our fault-injection tool: rules inject an errno into chosen
// operations on a chosen offset range, after N matching events, once or always; `align`
// and `max-transfer` impose I/O limits on the requests it passes (to exercise the generic
// layer's read-modify-write and splitting).
//
// inject-error: [{ event?, state?, iotype?: op | op[] (default every op), errno?: 'EIO' |
// number (default EIO), sector?, once?: boolean (default false), immediately?, and
// vm-disk's offset?, length? (default to the end), after? (matching requests let through
// first, default 0) }] where op is read, write, write-zeroes, discard, flush or
// block-status; set-state: [{ event, state?, new_state }].
//
// QEMU's rules (with an event) work as its blkdebug.c: an event arms the rules of it for
// the current state (0: any; the state starts at 1), and the armed ones fail every later
// request they match (iotype, sector) until the next event that arms some; set-state
// rules move the state on their event. QEMU's drivers raise events at points of their
// own (qcow2's l2_load...); here the requests reaching blkdebug raise the ones the block
// layer and a format above would raise for them: read_aio for a read, write_aio and
// pwritev for a write, pwritev_zero for a write of zeroes, flush_to_os and flush_to_disk
// for a flush. Other events are taken, and never raised. A rule without an event
// (vm-disk's) is armed from the start.

import {
  type BdrvChild,
  defineDriver,
  type FilterInstance,
  type FilterRequest,
} from '../driver.ts';
import { BlockIoError, BlockOptionError, errnoName, errnoNumber } from '../errors.ts';
import { bool, custom, enumOf, type Infer, int, list, opt, struct } from '../schema.ts';

const OPS = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
type Op = (typeof OPS)[number];

/** QEMU 7.2's BlkdebugEvent. */
const EVENTS = [
  'l1_update',
  'l1_grow_alloc_table',
  'l1_grow_write_table',
  'l1_grow_activate_table',
  'l2_load',
  'l2_update',
  'l2_update_compressed',
  'l2_alloc_cow_read',
  'l2_alloc_write',
  'read_aio',
  'read_backing_aio',
  'read_compressed',
  'write_aio',
  'write_compressed',
  'vmstate_load',
  'vmstate_save',
  'cow_read',
  'cow_write',
  'reftable_load',
  'reftable_grow',
  'reftable_update',
  'refblock_load',
  'refblock_update',
  'refblock_update_part',
  'refblock_alloc',
  'refblock_alloc_hookup',
  'refblock_alloc_write',
  'refblock_alloc_write_blocks',
  'refblock_alloc_write_table',
  'refblock_alloc_switch_table',
  'cluster_alloc',
  'cluster_alloc_bytes',
  'cluster_free',
  'flush_to_os',
  'flush_to_disk',
  'pwritev_rmw_head',
  'pwritev_rmw_after_head',
  'pwritev_rmw_tail',
  'pwritev_rmw_after_tail',
  'pwritev',
  'pwritev_zero',
  'pwritev_done',
  'empty_image_prepare',
  'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters',
  'cor_write',
  'cluster_alloc_space',
  'none',
] as const;
type BlkdebugEvent = (typeof EVENTS)[number];

/** The events a request reaching blkdebug raises first (see above). */
const RAISED: Record<Op, readonly BlkdebugEvent[]> = {
  read: ['read_aio'],
  write: ['write_aio', 'pwritev'],
  'write-zeroes': ['pwritev_zero'],
  discard: [],
  flush: ['flush_to_os', 'flush_to_disk'],
  'block-status': [],
};

interface Rule {
  /** QEMU's: armed by this event (absent: armed from the start). */
  event: BlkdebugEvent | undefined;
  /** The state the event arms it in (0: any). */
  state: number;
  /** QEMU's sector: a request must cover this byte (absent: any). */
  at: number | undefined;
  ops: Set<Op>;
  errnoName: string;
  errno: number;
  start: number;
  end: number;
  after: number;
  once: boolean;
  seen: number;
  fired: number;
}

const op = enumOf(OPS);

/** An op or a list of them. */
const iotype = custom('BlkdebugIOType', (v, key, syntax): Op[] =>
  typeof v === 'string' ? [op.parse(v, key, syntax)] : list(op).parse(v, key, syntax),
);

/** An errno name ('EIO') or number (QEMU's is a number). */
const errno = custom('BlkdebugErrno', (v, key, syntax): string => {
  const name =
    typeof v === 'string' && /^E[A-Z0-9]+$/.test(v)
      ? v
      : errnoName(int({ min: 1 }).parse(v, key, syntax));
  if (!name || errnoNumber(name) === 0) {
    throw new BlockOptionError(key, `'${String(v)}' is not an errno`);
  }
  return name;
});

/** One rule of inject-error, with its defaults: QEMU's members, then vm-disk's. */
const rule = struct({
  event: opt(enumOf(EVENTS)),
  state: opt(int(), 0),
  iotype: opt(iotype, [...OPS]),
  errno: opt(errno, 'EIO'),
  // Negative: any (QEMU's default, -1).
  sector: opt(int()),
  once: opt(bool, false),
  // Whether the error comes at once or after a yield: no difference here.
  immediately: opt(bool, false),
  offset: opt(int({ min: 0 }), 0),
  length: opt(int({ min: 1 })),
  after: opt(int({ min: 0 }), 0),
});
type RuleOptions = Infer<typeof rule>;

/** One rule of set-state: on `event` in `state` (0: any), the state becomes new_state. */
const setStateRule = struct({
  event: enumOf(EVENTS),
  state: opt(int(), 0),
  new_state: int(),
});
type SetStateRule = Infer<typeof setStateRule>;

class BlkdebugInstance implements FilterInstance {
  readonly kind = 'filter';
  readonly limits: { requestAlignment?: number; maxTransfer?: number };
  private readonly events: Record<Op, number> = {
    read: 0,
    write: 0,
    'write-zeroes': 0,
    discard: 0,
    flush: 0,
    'block-status': 0,
  };

  readonly child: BdrvChild;
  private rules: Rule[];
  /** The rules armed now, first match first (QEMU's active_rules). */
  private armed: Rule[];
  private state = 1;
  private readonly setState: readonly SetStateRule[];
  private readonly node: string;

  constructor(
    child: BdrvChild,
    rules: Rule[],
    setState: readonly SetStateRule[],
    align: number | undefined,
    maxTransfer: number | undefined,
    node: string,
  ) {
    this.setState = setState;
    this.node = node;
    this.child = child;
    this.rules = rules;
    this.armed = rules.filter((r) => r.event === undefined);
    this.limits = {};
    if (align !== undefined) this.limits.requestAlignment = align;
    if (maxTransfer !== undefined) this.limits.maxTransfer = maxTransfer;
  }

  size(): number {
    return this.child.node.size();
  }

  /** blkdebug_debug_event: arms the event's inject rules, moves the state. */
  private raise(event: BlkdebugEvent): void {
    let newState = this.state;
    let injected = false;
    // QEMU keeps an event's rules newest first, and arms each at the head.
    for (const r of [...this.rules].reverse()) {
      if (r.event !== event || (r.state !== 0 && r.state !== this.state)) continue;
      if (!injected) {
        this.armed = this.armed.filter((a) => a.event === undefined);
        injected = true;
      }
      this.armed.unshift(r);
    }
    for (const r of [...this.setState].reverse()) {
      if (r.event === event && (r.state === 0 || r.state === this.state)) newState = r.new_state;
    }
    this.state = newState;
  }

  intercept(req: FilterRequest): Promise<void> | undefined {
    this.events[req.op]++;
    for (const event of RAISED[req.op]) this.raise(event);
    for (const r of this.armed) {
      if (!r.ops.has(req.op)) continue;
      if (req.op !== 'flush' && !(req.offset < r.end && r.start < req.offset + req.length))
        continue;
      // QEMU's sector: the request covers it (a flush covers none).
      if (
        r.at !== undefined &&
        !(req.op !== 'flush' && req.offset <= r.at && r.at < req.offset + req.length)
      )
        continue;
      r.seen++;
      if (r.seen <= r.after || (r.once && r.fired > 0)) continue;
      r.fired++;
      // A QEMU rule that fires once is gone.
      if (r.once && r.event !== undefined) {
        this.armed = this.armed.filter((a) => a !== r);
        this.rules = this.rules.filter((a) => a !== r);
      }
      return Promise.reject(
        new BlockIoError(
          `${r.errnoName}: injected by blkdebug on ${req.op} at ${req.offset} (+${req.length})`,
          {
            errnoName: r.errnoName,
            errno: r.errno,
            syscall: 'blkdebug',
            offset: req.offset,
            length: req.length,
            node: this.node,
          },
        ),
      );
    }
    return undefined;
  }

  info(): Record<string, unknown> {
    return {
      events: { ...this.events },
      state: this.state,
      rules: this.rules.map((r) => ({ errno: r.errnoName, seen: r.seen, fired: r.fired })),
    };
  }
}

export const blkdebugDriver = defineDriver({
  name: 'blkdebug',
  options: {
    align: opt(int({ min: 1 })),
    'max-transfer': opt(int({ min: 1 })),
    'inject-error': opt(list(rule)),
    'set-state': opt(list(setStateRule)),
  },
  children: [{ key: 'image', required: true, roles: () => ['filtered', 'primary'] }],
  validate(o) {
    const { align, 'max-transfer': max } = o;
    if (align !== undefined && (align & (align - 1)) !== 0) {
      throw new BlockOptionError('align', `${align} is not a power of two`);
    }
    if (align !== undefined && max !== undefined && max % align !== 0) {
      throw new BlockOptionError('max-transfer', `${max} is not a multiple of align (${align})`);
    }
  },
  async open(ctx) {
    const given: RuleOptions[] = ctx.options['inject-error'] ?? [];
    const rules: Rule[] = given.map((r) => ({
      event: r.event,
      state: r.state,
      at: r.sector === undefined || r.sector < 0 ? undefined : r.sector * 512,
      ops: new Set(r.iotype),
      errnoName: r.errno,
      errno: errnoNumber(r.errno),
      start: r.offset,
      end: r.length === undefined ? Number.MAX_SAFE_INTEGER : r.offset + r.length,
      after: r.after,
      once: r.once,
      seen: 0,
      fired: 0,
    }));
    return new BlkdebugInstance(
      ctx.children.image!,
      rules,
      ctx.options['set-state'] ?? [],
      ctx.options.align,
      ctx.options['max-transfer'],
      ctx.nodeName,
    );
  },
});
