// The io_uring backend's registered-buffer table: a sparse table of BUFFER_SLOTS slots
// (IORING_REGISTER_BUFFERS2, Linux >= 5.19) that arena slabs are registered into as they
// come, as long as the memlock limit allows. Requests whose buffer lies in a registered
// slab may go as READ_FIXED/WRITE_FIXED (io-uring.ts decides which).
import { addressOf, ioUringRegister } from './native.ts';

const REGISTER_BUFFERS2 = 15;
const REGISTER_BUFFERS_UPDATE = 16;
const RSRC_REGISTER_SPARSE = 1;
/** Entries of the registered-buffer table (sparse; arena slabs fill it as they come). */
const BUFFER_SLOTS = 1024;
const TWO32 = 4294967296;

/** A registered slab: its slot and its addresses. */
export interface Registered {
  index: number;
  start: number;
  end: number;
}

export class BufferTable {
  private readonly ringFd: number;
  /** Registered memory, by the ArrayBuffer that owns it. */
  private readonly registered = new WeakMap<ArrayBufferLike, Registered>();
  /** Slots of the table never used yet start here; freed ones are reused. */
  private nextSlot = 0;
  private readonly freeSlots: number[] = [];
  /** Slabs registered now. */
  count = 0;

  private constructor(ringFd: number) {
    this.ringFd = ringFd;
  }

  /** Creates the sparse table on the ring; undefined where the kernel refuses it. */
  static create(ringFd: number): BufferTable | undefined {
    // struct io_uring_rsrc_register { u32 nr; u32 flags; u64 resv2; u64 data; u64 tags; }
    const arg = new Uint32Array(8);
    arg[0] = BUFFER_SLOTS;
    arg[1] = RSRC_REGISTER_SPARSE;
    return ioUringRegister(ringFd, REGISTER_BUFFERS2, arg, 32) === 0
      ? new BufferTable(ringFd)
      : undefined;
  }

  /** The registration of the slab that owns `buffer`, if any. */
  lookup(buffer: ArrayBufferLike): Registered | undefined {
    return this.registered.get(buffer);
  }

  /**
   * Registers `mem` (an arena slab: memory that stays reachable as long as the engine is
   * open). False where the table is full or the memlock limit refuses it.
   */
  register(mem: Uint8Array): boolean {
    const index = this.freeSlots.pop() ?? this.nextSlot;
    if (index >= BUFFER_SLOTS) return false;
    const start = addressOf(mem);
    if (!this.updateSlot(index, start, mem.byteLength)) {
      if (index !== this.nextSlot) this.freeSlots.push(index);
      return false;
    }
    if (index === this.nextSlot) this.nextSlot++;
    this.count++;
    this.registered.set(mem.buffer, { index, start, end: start + mem.byteLength });
    return true;
  }

  /**
   * Unregisters a slab before the arena frees it (none of its requests is in flight; the
   * kernel unpins the pages once the requests it saw with it are done). The slot is
   * reused.
   */
  unregister(mem: Uint8Array): void {
    const reg = this.registered.get(mem.buffer);
    if (reg === undefined) return;
    this.registered.delete(mem.buffer);
    // An empty iovec clears a slot of a sparse table.
    if (!this.updateSlot(reg.index, 0, 0)) return;
    this.count--;
    this.freeSlots.push(reg.index);
  }

  /** IORING_REGISTER_BUFFERS_UPDATE of one slot with one iovec. */
  private updateSlot(index: number, start: number, length: number): boolean {
    const iov = new Uint32Array(4);
    iov[0] = start >>> 0;
    iov[1] = (start / TWO32) >>> 0;
    iov[2] = length;
    // struct io_uring_rsrc_update2 { u32 offset; u32 resv; u64 data; u64 tags; u32 nr; u32 resv2; }
    const upd = new Uint32Array(8);
    const data = addressOf(iov);
    upd[0] = index;
    upd[2] = data >>> 0;
    upd[3] = (data / TWO32) >>> 0;
    upd[6] = 1;
    return ioUringRegister(this.ringFd, REGISTER_BUFFERS_UPDATE, upd, 32) === 1;
  }
}
