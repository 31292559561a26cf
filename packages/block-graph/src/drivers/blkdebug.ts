// The `blkdebug` filter, our fault-injection tool: rules inject an errno into chosen
// operations on a chosen offset range, after N matching events, once or always; `align`
// and `max-transfer` impose I/O limits on the requests it passes (to exercise the generic
// layer's read-modify-write and splitting).
//
// inject-error: [{ iotype?: op | op[] (default every op), errno?: 'EIO' | number (default
// EIO), offset?: number (default 0), length?: number (default to the end), after?: number
// (matching events let through first, default 0), once?: boolean (default false) }]
// where op is read, write, write-zeroes, discard, flush or block-status.

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

interface Rule {
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

/** One rule of inject-error, with its defaults. */
const rule = struct({
  iotype: opt(iotype, [...OPS]),
  errno: opt(errno, 'EIO'),
  offset: opt(int({ min: 0 }), 0),
  length: opt(int({ min: 1 })),
  after: opt(int({ min: 0 }), 0),
  once: opt(bool, false),
});
type RuleOptions = Infer<typeof rule>;

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
  private readonly rules: Rule[];
  private readonly node: string;

  constructor(
    child: BdrvChild,
    rules: Rule[],
    align: number | undefined,
    maxTransfer: number | undefined,
    node: string,
  ) {
    this.child = child;
    this.rules = rules;
    this.node = node;
    this.limits = {};
    if (align !== undefined) this.limits.requestAlignment = align;
    if (maxTransfer !== undefined) this.limits.maxTransfer = maxTransfer;
  }

  size(): number {
    return this.child.node.size();
  }

  intercept(req: FilterRequest): Promise<void> | undefined {
    this.events[req.op]++;
    for (const r of this.rules) {
      if (!r.ops.has(req.op)) continue;
      if (req.op !== 'flush' && !(req.offset < r.end && r.start < req.offset + req.length))
        continue;
      r.seen++;
      if (r.seen <= r.after || (r.once && r.fired > 0)) continue;
      r.fired++;
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
      ctx.options.align,
      ctx.options['max-transfer'],
      ctx.nodeName,
    );
  },
});
