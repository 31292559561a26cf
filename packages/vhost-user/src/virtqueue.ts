// One split virtqueue (virtio 1.1, 2.6): the available ring read, descriptor chains
// walked (indirect tables included) into views of guest memory, the used ring written and
// the guest signalled through the call eventfd. The guest's memory is shared with it and
// changes under us: every index it gives is checked before use, and index fields go
// through Atomics (a full barrier on x86 stores, so that the used index is published
// after its entry and event-index checks read fresh values).
import { VhostUserError } from './errors.ts';
import type { MemoryTable } from './memory-table.ts';
import { eventfdSignal } from './native.ts';
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
} from './protocol.ts';

/** A descriptor chain: what the guest gave to read (out) and to write (in). */
export interface VirtqElement {
  head: number;
  /** Device-readable buffers, in order (views of guest memory). */
  out: Uint8Array[];
  /** Device-writable buffers, in order. */
  in: Uint8Array[];
  /** Some buffer was outside guest memory (left out of out/in). */
  badAddress: boolean;
  /** The chain's last descriptor is device-writable and mapped (it holds the status). */
  lastInMapped: boolean;
}

export interface VringAddrs {
  desc: bigint;
  used: bigint;
  avail: bigint;
}

function broken(message: string): VhostUserError {
  return new VhostUserError('ERR_VMDISK_VHOST_DEVICE_BROKEN', message);
}

export class Virtqueue {
  num = 0;
  addrs: VringAddrs | undefined;
  /** The next available-ring index to read (SET/GET_VRING_BASE). */
  lastAvailIdx = 0;
  private usedIdx = 0;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  /** SET_VRING_ENABLE 0 stops processing; rings are processed once they have a kick fd. */
  enabled = true;
  eventIdx = false;
  inFlight = 0;
  private idle: (() => void)[] = [];

  private desc: DataView | undefined;
  private avail: Uint16Array | undefined;
  private usedHead: Uint16Array | undefined;
  private usedRing: Uint32Array | undefined;
  private memory: MemoryTable | undefined;
  private signalPending = false;

  readonly index: number;

  constructor(index: number) {
    this.index = index;
  }

  get ready(): boolean {
    return this.desc !== undefined;
  }

  /** Maps the rings in `memory` (at SET_VRING_KICK, or a new memory table). */
  attach(memory: MemoryTable): void {
    const a = this.addrs;
    if (!a || this.num === 0)
      throw broken(`vring ${this.index}: started without size or addresses`);
    const n = this.num;
    const desc = memory.frontEnd(Number(a.desc), n * VRING_DESC_SIZE);
    const avail = memory.frontEnd(Number(a.avail), 6 + 2 * n);
    const used = memory.frontEnd(Number(a.used), 6 + 8 * n);
    if (!desc || !avail || !used)
      throw broken(`vring ${this.index}: a ring is outside guest memory`);
    if (avail.byteOffset % 2 !== 0 || used.byteOffset % 4 !== 0) {
      throw broken(`vring ${this.index}: misaligned ring`);
    }
    this.desc = new DataView(desc.buffer, desc.byteOffset, desc.byteLength);
    this.avail = new Uint16Array(avail.buffer, avail.byteOffset, 3 + n);
    this.usedHead = new Uint16Array(used.buffer, used.byteOffset, 4 + 4 * n);
    this.usedRing = new Uint32Array(used.buffer, used.byteOffset + 4, 2 * n);
    this.usedIdx = Atomics.load(this.usedHead, 1);
    this.memory = memory;
  }

  detach(): void {
    this.desc = undefined;
    this.avail = undefined;
    this.usedHead = undefined;
    this.usedRing = undefined;
    this.memory = undefined;
  }

  /** The next available chain, or null when none; throws DEVICE_BROKEN on a bad ring. */
  pop(): VirtqElement | null {
    const avail = this.avail;
    const memory = this.memory;
    if (!avail || !memory) return null;
    const availIdx = Atomics.load(avail, 1);
    const pending = (availIdx - this.lastAvailIdx) & 0xffff;
    if (pending === 0) {
      if (this.eventIdx) {
        // Ask for a kick at the next buffer, then look again: one may have come meanwhile.
        Atomics.store(this.usedHead!, 2 + 4 * this.num, this.lastAvailIdx);
        if (Atomics.load(avail, 1) === availIdx) return null;
        return this.pop();
      }
      return null;
    }
    if (pending > this.num) {
      throw broken(`vring ${this.index}: avail index moved by ${pending} (size ${this.num})`);
    }
    const head = Atomics.load(avail, 2 + (this.lastAvailIdx % this.num));
    this.lastAvailIdx = (this.lastAvailIdx + 1) & 0xffff;
    if (head >= this.num) throw broken(`vring ${this.index}: head ${head} out of range`);
    return this.walk(head, memory);
  }

  private walk(head: number, memory: MemoryTable): VirtqElement {
    const el: VirtqElement = { head, out: [], in: [], badAddress: false, lastInMapped: false };
    let table = this.desc!;
    let size = this.num;
    let i = head;
    let count = 0;
    let indirect = false;
    for (;;) {
      const at = i * VRING_DESC_SIZE;
      const addr = table.getUint32(at, true) + table.getUint32(at + 4, true) * 2 ** 32;
      const len = table.getUint32(at + 8, true);
      const flags = table.getUint16(at + 12, true);
      const next = table.getUint16(at + 14, true);
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) throw broken(`vring ${this.index}: nested indirect descriptor table`);
        if (
          len === 0 ||
          len % VRING_DESC_SIZE !== 0 ||
          len / VRING_DESC_SIZE > VIRTQUEUE_MAX_SIZE
        ) {
          throw broken(`vring ${this.index}: indirect table of ${len} bytes`);
        }
        const bytes = memory.guest(addr, len);
        if (!bytes) throw broken(`vring ${this.index}: indirect table outside guest memory`);
        table = new DataView(bytes.buffer, bytes.byteOffset, len);
        size = len / VRING_DESC_SIZE;
        i = 0;
        count = 0;
        indirect = true;
        continue;
      }
      if (++count > size)
        throw broken(`vring ${this.index}: descriptor chain loops or is too long`);
      const write = (flags & VRING_DESC_F_WRITE) !== 0;
      if (!write && el.in.length > 0) {
        throw broken(`vring ${this.index}: readable descriptor after a writable one`);
      }
      const pieces = write ? el.in : el.out;
      const mapped = len === 0 || memory.guestPieces(addr, len, pieces);
      if (!mapped) el.badAddress = true;
      if (!(flags & VRING_DESC_F_NEXT)) {
        el.lastInMapped = write && mapped && len > 0;
        return el;
      }
      i = next;
      if (i >= size) throw broken(`vring ${this.index}: next descriptor ${i} out of range`);
    }
  }

  /** Returns a chain to the guest with `len` bytes written; the signal follows in a batch. */
  push(head: number, len: number): void {
    const ring = this.usedRing;
    const usedHead = this.usedHead;
    if (!ring || !usedHead) return; // stopped meanwhile (GET_VRING_BASE waits, so: reset)
    const slot = this.usedIdx % this.num;
    ring[slot * 2] = head;
    ring[slot * 2 + 1] = len;
    const old = this.usedIdx;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    Atomics.store(usedHead, 1, this.usedIdx);
    if (!this.signalPending) {
      this.signalPending = true;
      this.signalFrom = old;
      // After the microtask queue drains: the requests that completed in the same event
      // loop turn are all pushed by then, and get one signal (a queued microtask would run
      // before the later ones reach push, through their chains of awaits).
      process.nextTick(this.signalNow);
    }
  }

  private signalFrom = 0;
  private readonly signalNow = (): void => this.signal();

  private signal(): void {
    this.signalPending = false;
    const avail = this.avail;
    if (!avail || this.callFd < 0) return;
    if (this.eventIdx) {
      // vring_need_event: signal when used_event lies in [old, new).
      const usedEvent = Atomics.load(avail, 2 + this.num);
      const n = this.usedIdx;
      if (((n - usedEvent - 1) & 0xffff) >= ((n - this.signalFrom) & 0xffff)) return;
    } else if (Atomics.load(avail, 0) & VRING_AVAIL_F_NO_INTERRUPT) return;
    eventfdSignal(this.callFd);
  }

  /** Counts a request in flight until done. */
  begin(): void {
    this.inFlight++;
  }

  end(): void {
    if (--this.inFlight === 0) for (const f of this.idle.splice(0)) f();
  }

  /** Resolves when no request of this queue is in flight. */
  drained(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }
}
