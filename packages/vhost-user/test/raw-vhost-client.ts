// A vhost-user front-end written for the tests (what QEMU's vhost-user-blk device does,
// by hand): it negotiates, shares "guest memory" (a memfd it made, as two regions so that
// mmap offsets are used), lays out split virtqueues in it and submits virtio-blk requests.
// It can also break the rules on purpose (looping chains, addresses outside memory).
import type { node } from 'koffi';
import {
  closeFd,
  connectUnix,
  EAGAIN,
  eventfd,
  eventfdRead,
  eventfdSignal,
  memfd,
  mmapShared,
  munmap,
  pollHandle,
  recvWithFds,
  sendWithFds,
  view,
} from '../src/native.ts';
import {
  BLK_S_OK,
  F,
  FLAG_NEED_REPLY,
  FLAG_VERSION,
  HEADER_SIZE,
  VHOST_USER,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from '../src/protocol.ts';

/** Guest physical addresses of the two regions, and the front-end addresses it reports. */
const REGION_SIZE = 8 * 1024 * 1024;
const GPA = [0x0n, 0x1_0000_0000n];
const UVA = [0x7f00_0000_0000n, 0x7f10_0000_0000n];

export interface Desc {
  gpa: bigint;
  len: number;
  write: boolean;
  /** Flags added to those the chain gives it (VRING_DESC_F_INDIRECT, for bad guests). */
  flags?: number;
}

export interface Completion {
  len: number;
  status: number;
}

interface Queue {
  num: number;
  desc: number;
  avail: number;
  used: number;
  kick: number;
  call: number;
  availIdx: number;
  usedSeen: number;
  poll: node.PollHandle;
  waiting: Map<number, (c: { len: number }) => void>;
}

export class RawVhostClient {
  private readonly fd: number;
  private readonly poll: node.PollHandle;
  private rx = new Uint8Array(0);
  private readers: (() => void)[] = [];
  private eof = false;
  readonly closed: Promise<void>;
  private markClosed!: () => void;
  private memFd = -1;
  private map = 0n;
  /** The whole of guest memory: region 0 then region 1, contiguous here. */
  mem = new Uint8Array(0);
  private next = 0x1000;
  private readonly queues = new Map<number, Queue>();
  /** VIRTIO_RING_F_EVENT_IDX negotiated: used_event is kept up to date in each avail ring. */
  private eventIdx = false;
  /** Kicks only when the device's avail_event asks for it (as Linux guests do). */
  private kickByEvent = false;
  /** Kicks sent (counted for tests). */
  kicks = 0;

  private constructor(fd: number) {
    this.fd = fd;
    this.closed = new Promise((resolve) => {
      this.markClosed = resolve;
    });
    this.poll = pollHandle(fd, () => this.onReadable());
  }

  static connect(path: string): RawVhostClient {
    const fd = connectUnix(path);
    if (fd < 0) throw new Error(`connect ${path}: errno ${-fd}`);
    return new RawVhostClient(fd);
  }

  private onReadable(): void {
    const buf = new Uint8Array(4096);
    const fds: number[] = [];
    const n = recvWithFds(this.fd, buf, 0, buf.length, fds);
    for (const f of fds) closeFd(f);
    if (n === -EAGAIN) return;
    if (n <= 0) {
      this.eof = true;
      this.poll.close();
      this.markClosed();
    } else {
      const joined = new Uint8Array(this.rx.length + n);
      joined.set(this.rx);
      joined.set(buf.subarray(0, n), this.rx.length);
      this.rx = joined;
    }
    for (const r of this.readers.splice(0)) r();
  }

  private async readReply(): Promise<{ request: number; flags: number; payload: DataView }> {
    for (;;) {
      if (this.rx.length >= HEADER_SIZE) {
        const v = new DataView(this.rx.buffer, this.rx.byteOffset);
        const size = v.getUint32(8, true);
        if (this.rx.length >= HEADER_SIZE + size) {
          const msg = this.rx.slice(0, HEADER_SIZE + size);
          this.rx = this.rx.slice(HEADER_SIZE + size);
          const mv = new DataView(msg.buffer);
          return {
            request: mv.getUint32(0, true),
            flags: mv.getUint32(4, true),
            payload: new DataView(msg.buffer, HEADER_SIZE),
          };
        }
      }
      if (this.eof) throw new Error('vhost-user connection closed');
      await new Promise<void>((resolve) => this.readers.push(resolve));
    }
  }

  /** Sends one message (no reply awaited). */
  send(
    request: number,
    payload: Uint8Array = new Uint8Array(0),
    fds: number[] = [],
    flags = 0,
  ): void {
    const out = new Uint8Array(HEADER_SIZE + payload.length);
    const v = new DataView(out.buffer);
    v.setUint32(0, request, true);
    v.setUint32(4, FLAG_VERSION | flags, true);
    v.setUint32(8, payload.length, true);
    out.set(payload, HEADER_SIZE);
    const n = sendWithFds(this.fd, out, fds);
    if (n !== out.length) throw new Error(`sendmsg: ${n}`);
  }

  /** Sends a request that has a reply and returns the reply's payload. */
  async call(request: number, payload?: Uint8Array, flags = 0): Promise<DataView> {
    this.send(request, payload, [], flags);
    const r = await this.readReply();
    if (r.request !== request) throw new Error(`reply to ${r.request}, expected ${request}`);
    return r.payload;
  }

  /** Sends with NEED_REPLY (REPLY_ACK negotiated) and returns the u64 status. */
  async ack(request: number, payload?: Uint8Array, fds: number[] = []): Promise<bigint> {
    this.send(request, payload, fds, FLAG_NEED_REPLY);
    const r = await this.readReply();
    return r.payload.getBigUint64(0, true);
  }

  async getU64(request: number): Promise<bigint> {
    return (await this.call(request)).getBigUint64(0, true);
  }

  /** Features and protocol features as QEMU negotiates them; returns the device's. */
  async negotiate(
    protocolFeatures: bigint,
    options: { eventIdx?: boolean; kickByEvent?: boolean } = {},
  ): Promise<{ features: bigint; protocol: bigint }> {
    const features = await this.getU64(VHOST_USER.GET_FEATURES);
    const protocol = await this.getU64(VHOST_USER.GET_PROTOCOL_FEATURES);
    this.send(VHOST_USER.SET_PROTOCOL_FEATURES, u64(protocol & protocolFeatures));
    this.send(VHOST_USER.SET_OWNER);
    this.eventIdx = options.eventIdx ?? false;
    this.kickByEvent = options.kickByEvent ?? false;
    const wanted = this.eventIdx ? features : features & ~(1n << BigInt(F.RING_EVENT_IDX));
    this.send(VHOST_USER.SET_FEATURES, u64(wanted));
    return { features, protocol };
  }

  /** GET_CONFIG of `size` bytes at `offset`. */
  async config(offset = 0, size = 60): Promise<DataView> {
    const p = new Uint8Array(12 + size);
    const v = new DataView(p.buffer);
    v.setUint32(0, offset, true);
    v.setUint32(4, size, true);
    const r = await this.call(VHOST_USER.GET_CONFIG, p);
    return new DataView(r.buffer, r.byteOffset + 12, size);
  }

  /** Makes guest memory (two regions of one memfd) and sends SET_MEM_TABLE. */
  memTablePayload(regions = 2): { payload: Uint8Array; fds: number[] } {
    if (this.memFd < 0) {
      this.memFd = memfd('guest', 2 * REGION_SIZE);
      const map = mmapShared(this.memFd, 2 * REGION_SIZE, 0n);
      if (typeof map === 'number') throw new Error(`mmap: ${map}`);
      this.map = map;
      this.mem = new Uint8Array(view(map, 2 * REGION_SIZE));
    }
    const p = new Uint8Array(8 + 32 * regions);
    const v = new DataView(p.buffer);
    v.setUint32(0, regions, true);
    for (let i = 0; i < regions; i++) {
      v.setBigUint64(8 + 32 * i, GPA[i]!, true);
      v.setBigUint64(16 + 32 * i, BigInt(REGION_SIZE), true);
      v.setBigUint64(24 + 32 * i, UVA[i]!, true);
      v.setBigUint64(32 + 32 * i, BigInt(i * REGION_SIZE), true);
    }
    return { payload: p, fds: Array.from({ length: regions }, () => this.memFd) };
  }

  async setMemTable(): Promise<bigint> {
    const { payload, fds } = this.memTablePayload();
    return this.ack(VHOST_USER.SET_MEM_TABLE, payload, fds);
  }

  /** Allocates `len` bytes of guest memory (region 0 up to its end, then region 1). */
  alloc(len: number, align = 16): bigint {
    this.next = Math.ceil(this.next / align) * align;
    if (this.next < REGION_SIZE && this.next + len > REGION_SIZE) this.next = REGION_SIZE;
    const at = this.next;
    this.next += len;
    return this.gpaOf(at);
  }

  /** Offset in `mem` of a guest physical address. */
  at(gpa: bigint): number {
    return gpa >= GPA[1]! ? Number(gpa - GPA[1]!) + REGION_SIZE : Number(gpa);
  }

  private gpaOf(offset: number): bigint {
    return offset >= REGION_SIZE ? GPA[1]! + BigInt(offset - REGION_SIZE) : BigInt(offset);
  }

  private uvaOf(gpa: bigint): bigint {
    return gpa >= GPA[1]! ? UVA[1]! + (gpa - GPA[1]!) : UVA[0]! + gpa;
  }

  /** Lays out vring `index` of `num` entries in guest memory and starts it. */
  startQueue(index: number, num = 128): void {
    const desc = this.at(this.alloc(16 * num, 16));
    const avail = this.at(this.alloc(6 + 2 * num, 2));
    const used = this.at(this.alloc(6 + 8 * num, 4));
    const kick = eventfd();
    const call = eventfd();
    const q: Queue = {
      num,
      desc,
      avail,
      used,
      kick,
      call,
      availIdx: 0,
      usedSeen: 0,
      waiting: new Map(),
      poll: pollHandle(call, () => {
        eventfdRead(call);
        this.reap(q);
      }),
    };
    this.queues.set(index, q);
    this.send(VHOST_USER.SET_VRING_NUM, pair(index, num));
    this.send(VHOST_USER.SET_VRING_BASE, pair(index, 0));
    const addr = new Uint8Array(40);
    const av = new DataView(addr.buffer);
    av.setUint32(0, index, true);
    av.setBigUint64(8, this.uvaOf(this.gpaOf(desc)), true);
    av.setBigUint64(16, this.uvaOf(this.gpaOf(used)), true);
    av.setBigUint64(24, this.uvaOf(this.gpaOf(avail)), true);
    this.send(VHOST_USER.SET_VRING_ADDR, addr);
    this.send(VHOST_USER.SET_VRING_CALL, u64(BigInt(index)), [call]);
    this.send(VHOST_USER.SET_VRING_KICK, u64(BigInt(index)), [kick]);
    this.send(VHOST_USER.SET_VRING_ENABLE, pair(index, 1));
  }

  private reap(q: Queue): void {
    const v = new DataView(this.mem.buffer, this.mem.byteOffset);
    const usedIdx = v.getUint16(q.used + 2, true);
    while (q.usedSeen !== usedIdx) {
      const slot = q.usedSeen % q.num;
      const id = v.getUint32(q.used + 4 + 8 * slot, true);
      const len = v.getUint32(q.used + 8 + 8 * slot, true);
      q.usedSeen = (q.usedSeen + 1) & 0xffff;
      const w = q.waiting.get(id);
      q.waiting.delete(id);
      w?.({ len });
    }
    // Ask to be signalled at the next used entry (used_event, after the avail ring).
    if (this.eventIdx) v.setUint16(q.avail + 4 + 2 * q.num, q.usedSeen, true);
  }

  /**
   * Puts a chain on queue `index` at descriptor `head` (descs head, head+1, ...; or one
   * indirect table) and kicks. `nextOf` overrides the next index of descriptor i (loops).
   */
  submitChain(
    index: number,
    descs: Desc[],
    options: { indirect?: boolean; head?: number; nextOf?: (i: number) => number } = {},
  ): Promise<{ len: number }> {
    const q = this.queues.get(index)!;
    const v = new DataView(this.mem.buffer, this.mem.byteOffset);
    const head = options.head ?? (q.availIdx * 8) % q.num;
    const writeDesc = (base: number, i: number, d: Desc, last: boolean) => {
      const at = base + 16 * i;
      v.setBigUint64(at, d.gpa, true);
      v.setUint32(at + 8, d.len, true);
      v.setUint16(
        at + 12,
        (d.write ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT) | (d.flags ?? 0),
        true,
      );
      v.setUint16(at + 14, options.nextOf?.(i) ?? i + 1, true);
    };
    if (options.indirect) {
      const table = this.alloc(16 * descs.length, 16);
      for (let i = 0; i < descs.length; i++) {
        writeDesc(this.at(table), i, descs[i]!, i === descs.length - 1);
      }
      const at = q.desc + 16 * head;
      v.setBigUint64(at, table, true);
      v.setUint32(at + 8, 16 * descs.length, true);
      v.setUint16(at + 12, VRING_DESC_F_INDIRECT, true);
    } else {
      for (let i = 0; i < descs.length; i++) {
        // With nextOf every descriptor has NEXT (a chain that may never end).
        writeDesc(q.desc, head + i, descs[i]!, i === descs.length - 1 && !options.nextOf);
      }
    }
    const done = new Promise<{ len: number }>((resolve) => q.waiting.set(head, resolve));
    v.setUint16(q.avail + 4 + 2 * (q.availIdx % q.num), head, true);
    const old = q.availIdx;
    q.availIdx = (q.availIdx + 1) & 0xffff;
    Atomics.store(
      new Uint16Array(this.mem.buffer, this.mem.byteOffset + q.avail, 2),
      1,
      q.availIdx,
    );
    // vring_need_event(avail_event, new, old): avail_event is after the used ring.
    const availEvent = Atomics.load(
      new Uint16Array(this.mem.buffer, this.mem.byteOffset + q.used + 4 + 8 * q.num, 1),
      0,
    );
    if (
      !this.kickByEvent ||
      ((q.availIdx - availEvent - 1) & 0xffff) < ((q.availIdx - old) & 0xffff)
    ) {
      this.kicks++;
      eventfdSignal(q.kick);
    }
    return done;
  }

  /** A virtio-blk request: header, data buffers, status; resolves with used len and status. */
  async blk(
    index: number,
    type: number,
    sector: bigint,
    data: { out?: Uint8Array; inLen?: number; segments?: number } = {},
    options: { indirect?: boolean } = {},
  ): Promise<Completion & { data: Uint8Array }> {
    const hdr = this.alloc(16);
    const hv = new DataView(this.mem.buffer, this.mem.byteOffset + this.at(hdr), 16);
    hv.setUint32(0, type, true);
    hv.setUint32(4, 0, true);
    hv.setBigUint64(8, sector, true);
    const descs: Desc[] = [{ gpa: hdr, len: 16, write: false }];
    const dataLen = data.out?.length ?? data.inLen ?? 0;
    const segments = data.segments ?? 1;
    const bufs: bigint[] = [];
    for (let s = 0; s < segments && dataLen > 0; s++) {
      const len = dataLen / segments;
      const gpa = this.alloc(len, 512);
      bufs.push(gpa);
      if (data.out) this.mem.set(data.out.subarray(s * len, (s + 1) * len), this.at(gpa));
      descs.push({ gpa, len, write: data.out === undefined });
    }
    const status = this.alloc(1, 1);
    this.mem[this.at(status)] = 0xff;
    descs.push({ gpa: status, len: 1, write: true });
    const { len } = await this.submitChain(index, descs, options);
    const out = new Uint8Array(dataLen);
    bufs.forEach((gpa, s) => {
      const l = dataLen / segments;
      out.set(this.mem.subarray(this.at(gpa), this.at(gpa) + l), s * l);
    });
    return { len, status: this.mem[this.at(status)]!, data: out };
  }

  /** Sends a GET_VRING_BASE and returns the ring's index (the ring stops). */
  async vringBase(index: number): Promise<number> {
    const r = await this.call(VHOST_USER.GET_VRING_BASE, pair(index, 0));
    return r.getUint32(4, true);
  }

  close(): void {
    if (!this.eof) this.poll.close();
    closeFd(this.fd);
    for (const q of this.queues.values()) {
      q.poll.close();
      closeFd(q.kick);
      closeFd(q.call);
    }
    if (this.memFd >= 0) {
      munmap(this.map, 2 * REGION_SIZE);
      closeFd(this.memFd);
    }
  }
}

export function u64(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
}

export function pair(a: number, b: number): Uint8Array {
  const p = new Uint8Array(8);
  const v = new DataView(p.buffer);
  v.setUint32(0, a, true);
  v.setUint32(4, b, true);
  return p;
}

export { BLK_S_OK };
