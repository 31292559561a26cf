// An arena of page-aligned memory for I/O buffers (usable for O_DIRECT). Memory comes in
// slabs (ArrayBuffers: native memory outside the JS heap that never moves), carved into
// page multiples; a released buffer's block goes to a free list of its size and is handed
// out again without a new allocation. Because the slabs are ArrayBuffers, a Buffer handed
// out keeps its memory alive as long as it is reachable (the in-flight table holds the
// buffers of every request until its completion), and nothing is unmapped under it. The
// arena keeps every slab until it is dropped with its engine, so a slab registered with
// io_uring (fixed buffers) stays valid as long as the ring that registered it.
import { EngineError, ErrorCode } from './errors.ts';
import { addressOf } from './native.ts';

export const PAGE = 4096;
const SLAB = 4 * 1024 * 1024;
/** Blocks at least this large get a slab of their own. */
const LARGE = 1024 * 1024;

interface Block {
  ab: ArrayBuffer;
  offset: number;
  capacity: number;
}

export class BufferArena {
  private readonly free = new Map<number, Block[]>();
  /** Every slab, kept for the life of the arena (registered memory must not be freed). */
  private readonly slabs: ArrayBuffer[] = [];
  private readonly owned = new WeakMap<Uint8Array, Block>();
  private slab: Block | null = null;
  private slabUsed = 0;
  /** Bytes of slabs allocated, for tests and stats. */
  allocatedBytes = 0;
  /** Told of each new slab (the page-aligned part), e.g. to register it with io_uring. */
  private readonly onSlab: ((mem: Uint8Array) => void) | undefined;

  constructor(onSlab?: (mem: Uint8Array) => void) {
    this.onSlab = onSlab;
  }

  alloc(length: number): Buffer {
    if (!Number.isSafeInteger(length) || length <= 0) {
      throw new EngineError(
        ErrorCode.INVALID_ARGUMENT,
        `allocBuffer: length must be a positive integer, got ${length}`,
      );
    }
    const capacity = Math.ceil(length / PAGE) * PAGE;
    const block = this.free.get(capacity)?.pop() ?? this.carve(capacity);
    const buf = Buffer.from(block.ab, block.offset, length);
    this.owned.set(buf, block);
    return buf;
  }

  release(buf: Uint8Array): void {
    const block = this.owned.get(buf);
    if (block === undefined) {
      throw new EngineError(
        ErrorCode.INVALID_ARGUMENT,
        'releaseBuffer: not a buffer of this engine, or already released',
      );
    }
    this.owned.delete(buf);
    let list = this.free.get(block.capacity);
    if (list === undefined) {
      list = [];
      this.free.set(block.capacity, list);
    }
    list.push(block);
  }

  private carve(capacity: number): Block {
    if (capacity >= LARGE) return this.newSlab(capacity);
    if (this.slab === null || this.slabUsed + capacity > this.slab.capacity) {
      this.slab = this.newSlab(SLAB);
      this.slabUsed = 0;
    }
    const block = { ab: this.slab.ab, offset: this.slab.offset + this.slabUsed, capacity };
    this.slabUsed += capacity;
    return block;
  }

  private newSlab(size: number): Block {
    const ab = new ArrayBuffer(size + PAGE);
    this.slabs.push(ab);
    const base = addressOf(new Uint8Array(ab));
    const offset = (PAGE - (base % PAGE)) % PAGE;
    this.allocatedBytes += size + PAGE;
    this.onSlab?.(new Uint8Array(ab, offset, size));
    return { ab, offset, capacity: size };
  }
}
