// A small allocating format driver for the tests of the generic layer's backing-chain
// logic (qcow2 plugs into the same interface): clusters of `cluster-size` bytes are
// allocated at the end of the `file` child on first write, unallocated clusters read from
// the `backing` child. Its table lives in memory: the data is real and goes through the
// graph, the metadata is not persisted (that is qcow2's business, not the generic layer's).

import type { BdrvChild, FormatInstance, Mapping } from '../src/index.ts';
import {
  BlockError,
  BlockErrorCode,
  BlockOptionError,
  defineDriver,
  schema,
} from '../src/index.ts';

const { int, opt, str } = schema;

class CowInstance implements FormatInstance {
  readonly kind = 'format';
  readonly table = new Map<number, number>();
  readonly zeroClusters = new Set<number>();
  private readonly pending = new Map<number, Promise<void>>();
  private next = 0;
  allocations = 0;

  private readonly file: BdrvChild;
  private readonly virtualSize: number;
  private readonly cs: number;

  constructor(file: BdrvChild, virtualSize: number, cs: number) {
    this.file = file;
    this.virtualSize = virtualSize;
    this.cs = cs;
  }

  size(): number {
    return this.virtualSize;
  }

  async map(offset: number, length: number, intent: 'read' | 'write'): Promise<Mapping> {
    const cs = this.cs;
    const c = Math.floor(offset / cs);
    const inCluster = offset - c * cs;
    const room = Math.min(length, cs - inCluster);
    for (;;) {
      const p = this.pending.get(c);
      if (!p) break;
      await p;
    }
    const host = this.table.get(c);
    if (host !== undefined)
      return { length: room, kind: 'data', child: this.file, offset: host + inCluster };
    if (intent === 'read')
      return { length: room, kind: this.zeroClusters.has(c) ? 'zero' : 'unallocated' };
    const newHost = this.next;
    this.next += cs;
    let done!: () => void;
    this.pending.set(
      c,
      new Promise<void>((resolve) => {
        done = resolve;
      }),
    );
    this.allocations++;
    const finish = () => {
      this.pending.delete(c);
      done();
    };
    return {
      length: room,
      kind: 'data',
      child: this.file,
      offset: newHost + inCluster,
      allocation: {
        start: c * cs,
        end: c * cs + cs,
        from: this.zeroClusters.has(c) ? 'zero' : 'below',
        commit: async () => {
          this.table.set(c, newHost);
          this.zeroClusters.delete(c);
          finish();
        },
        abort: async () => finish(),
      },
    };
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    // Whole clusters become zero clusters; anything else the generic layer emulates.
    if (offset % this.cs !== 0 || length % this.cs !== 0) {
      throw new BlockError(BlockErrorCode.NOT_SUPPORTED, 'only whole clusters');
    }
    for (let c = Math.ceil(offset / this.cs); (c + 1) * this.cs <= offset + length; c++) {
      this.table.delete(c);
      this.zeroClusters.add(c);
    }
  }

  info(): Record<string, unknown> {
    return { allocated: this.table.size, allocations: this.allocations };
  }
}

export const cowFormat = defineDriver({
  name: 'test-cow',
  options: {
    size: int({ min: 0 }),
    'cluster-size': opt(int({ min: 512 })),
    /** A raw backing file to open when no 'backing' is given (as qcow2's header names one). */
    'backing-file': opt(str),
  },
  children: [
    { key: 'file', required: true, roles: () => ['data', 'metadata', 'primary'] },
    { key: 'backing', required: false, nullable: true, roles: () => ['cow'] },
  ],
  validate(o) {
    const cs = o['cluster-size'] ?? 65536;
    if ((cs & (cs - 1)) !== 0) throw new BlockOptionError('cluster-size', 'not a power of two');
  },
  async open(ctx) {
    const backingFile = ctx.options['backing-file'];
    if (backingFile !== undefined && !ctx.children.backing) {
      await ctx.openChild('backing', {
        driver: 'raw',
        file: { driver: 'file', filename: backingFile },
      });
    }
    return new CowInstance(
      ctx.children.file!,
      ctx.options.size,
      ctx.options['cluster-size'] ?? 65536,
    );
  },
});
