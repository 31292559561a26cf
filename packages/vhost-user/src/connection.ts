// One front-end connection (QEMU's vhost-user-blk device, or a test's client): its
// messages read off the unix socket with the fds that come with them, handled one at a
// time in order, and the device state they build (features, memory table, vrings).
import type { node } from 'koffi';
import { type BlkDevice, processBlkRequest } from './blk-request.ts';
import { VhostUserError } from './errors.ts';
import { type MemoryRegionDesc, MemoryTable } from './memory-table.ts';
import {
  closeFd,
  EAGAIN,
  EINTR,
  eventfdRead,
  pollHandle,
  recvWithFds,
  sendWithFds,
} from './native.ts';
import {
  BLK_CONFIG_SIZE,
  BLK_CONFIG_WRITEBACK_OFFSET,
  bit,
  encodeBlkConfig,
  F,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_VERSION,
  HEADER_SIZE,
  MAX_MEM_REGIONS,
  MAX_PAYLOAD,
  PROTOCOL_F,
  PROTOCOL_FEATURES,
  SECTOR_SIZE,
  VHOST_USER,
  VIRTQUEUE_MAX_SIZE,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from './protocol.ts';
import { type VirtqElement, Virtqueue } from './virtqueue.ts';

export interface DeviceOptions extends BlkDevice {
  numQueues: number;
  features: bigint;
  onError(err: VhostUserError): void;
}

interface Message {
  request: number;
  flags: number;
  payload: DataView;
  fds: number[];
}

function badMessage(message: string): VhostUserError {
  return new VhostUserError('ERR_VMDISK_VHOST_BAD_MESSAGE', message);
}

export class VhostUserConnection {
  private readonly poll: node.PollHandle;
  private readonly header = new Uint8Array(HEADER_SIZE);
  private got = 0;
  private payload: Uint8Array | undefined;
  private fds: number[] = [];
  private readonly queue: Message[] = [];
  private handling = false;
  private closing: Promise<void> | undefined;
  private readonly queues: Virtqueue[];
  private readonly kickPolls = new Map<number, node.PollHandle>();
  private memory: MemoryTable | undefined;
  private features = 0n;
  private protocolFeatures = 0n;
  private broken = false;
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  private readonly fd: number;
  private readonly dev: DeviceOptions;

  constructor(fd: number, dev: DeviceOptions) {
    this.fd = fd;
    this.dev = dev;
    this.queues = Array.from({ length: dev.numQueues }, (_, i) => new Virtqueue(i));
    this.closed = new Promise((resolve) => {
      this.markClosed = resolve;
    });
    this.poll = pollHandle(fd, () => this.onReadable());
  }

  /** Requests in flight on all queues. */
  get inFlight(): number {
    let n = 0;
    for (const q of this.queues) n += q.inFlight;
    return n;
  }

  private onReadable(): void {
    for (;;) {
      const buf = this.payload ?? this.header;
      const n = recvWithFds(this.fd, buf, this.got, buf.length - this.got, this.fds);
      if (n === -EAGAIN || n === -EINTR) return;
      if (n <= 0) {
        void this.close();
        return;
      }
      this.got += n;
      if (this.got < buf.length) continue;
      if (!this.payload) {
        const v = new DataView(this.header.buffer);
        const size = v.getUint32(8, true);
        if (size > MAX_PAYLOAD) {
          this.fail(badMessage(`message of ${size} bytes (at most ${MAX_PAYLOAD})`));
          return;
        }
        this.payload = new Uint8Array(size);
        this.got = 0;
        if (size > 0) continue;
      }
      const v = new DataView(this.header.buffer);
      this.queue.push({
        request: v.getUint32(0, true),
        flags: v.getUint32(4, true),
        payload: new DataView(this.payload.buffer),
        fds: this.fds,
      });
      this.fds = [];
      this.payload = undefined;
      this.got = 0;
      void this.drain();
    }
  }

  private async drain(): Promise<void> {
    if (this.handling) return;
    this.handling = true;
    try {
      for (let m = this.queue.shift(); m && !this.closing; m = this.queue.shift()) {
        try {
          const reply = await this.handle(m);
          if (reply) this.reply(m, reply);
          else if (m.flags & FLAG_NEED_REPLY && this.has(PROTOCOL_F.REPLY_ACK)) {
            this.reply(m, u64(0n));
          }
        } catch (e) {
          for (const fd of m.fds) closeFd(fd);
          this.fail(
            e instanceof VhostUserError
              ? e
              : badMessage(e instanceof Error ? e.message : String(e)),
          );
        }
      }
    } finally {
      this.handling = false;
    }
  }

  private has(protocolFeature: number): boolean {
    return (this.protocolFeatures & bit(protocolFeature)) !== 0n;
  }

  private reply(m: Message, payload: Uint8Array): void {
    const out = new Uint8Array(HEADER_SIZE + payload.length);
    const v = new DataView(out.buffer);
    v.setUint32(0, m.request, true);
    v.setUint32(4, FLAG_VERSION | FLAG_REPLY, true);
    v.setUint32(8, payload.length, true);
    out.set(payload, HEADER_SIZE);
    if (sendWithFds(this.fd, out, []) !== out.length) {
      this.fail(badMessage(`could not send the reply to request ${m.request}`));
    }
  }

  private queueOf(index: number): Virtqueue {
    const q = this.queues[index];
    if (!q) throw badMessage(`vring ${index} does not exist (${this.queues.length} queues)`);
    return q;
  }

  /** Handles one message: the reply's payload, or undefined for none. */
  private async handle(m: Message): Promise<Uint8Array | undefined> {
    const p = m.payload;
    const need = (n: number) => {
      if (p.byteLength < n)
        throw badMessage(`request ${m.request}: payload of ${p.byteLength} bytes`);
    };
    switch (m.request) {
      case VHOST_USER.GET_FEATURES:
        return u64(this.dev.features);
      case VHOST_USER.SET_FEATURES: {
        need(8);
        this.features = p.getBigUint64(0, true);
        const eventIdx = (this.features & bit(F.RING_EVENT_IDX)) !== 0n;
        for (const q of this.queues) q.eventIdx = eventIdx;
        return undefined;
      }
      case VHOST_USER.GET_PROTOCOL_FEATURES:
        return u64(PROTOCOL_FEATURES);
      case VHOST_USER.SET_PROTOCOL_FEATURES:
        need(8);
        this.protocolFeatures = p.getBigUint64(0, true) & PROTOCOL_FEATURES;
        return undefined;
      case VHOST_USER.SET_OWNER:
        return undefined;
      case VHOST_USER.RESET_OWNER:
      case VHOST_USER.RESET_DEVICE:
        await this.reset();
        return undefined;
      case VHOST_USER.GET_QUEUE_NUM:
        return u64(BigInt(this.queues.length));
      case VHOST_USER.SET_MEM_TABLE:
        this.setMemTable(p, m.fds);
        return undefined;
      case VHOST_USER.SET_VRING_NUM: {
        need(8);
        const q = this.queueOf(p.getUint32(0, true));
        const num = p.getUint32(4, true);
        if (num === 0 || num > VIRTQUEUE_MAX_SIZE || (num & (num - 1)) !== 0) {
          throw badMessage(`vring ${q.index}: size ${num}`);
        }
        q.num = num;
        return undefined;
      }
      case VHOST_USER.SET_VRING_ADDR: {
        need(40);
        const q = this.queueOf(p.getUint32(0, true));
        q.addrs = {
          desc: p.getBigUint64(8, true),
          used: p.getBigUint64(16, true),
          avail: p.getBigUint64(24, true),
        };
        return undefined;
      }
      case VHOST_USER.SET_VRING_BASE: {
        need(8);
        const q = this.queueOf(p.getUint32(0, true));
        q.lastAvailIdx = p.getUint32(4, true) & 0xffff;
        return undefined;
      }
      case VHOST_USER.GET_VRING_BASE: {
        need(8);
        const q = this.queueOf(p.getUint32(0, true));
        // The ring stops: its requests finish first, so that the front-end's index is final.
        this.stopQueue(q);
        await q.drained();
        q.detach();
        for (const fd of [q.kickFd, q.callFd, q.errFd]) if (fd >= 0) closeFd(fd);
        q.kickFd = q.callFd = q.errFd = -1;
        return vringState(q.index, q.lastAvailIdx);
      }
      case VHOST_USER.SET_VRING_KICK:
      case VHOST_USER.SET_VRING_CALL:
      case VHOST_USER.SET_VRING_ERR: {
        need(8);
        const v = Number(p.getBigUint64(0, true) & 0xffffn);
        const q = this.queueOf(v & VRING_IDX_MASK);
        const fd = v & VRING_NOFD_MASK ? -1 : m.fds.shift();
        for (const extra of m.fds.splice(0)) closeFd(extra);
        if (fd === undefined) throw badMessage(`request ${m.request}: no fd came with it`);
        if (m.request === VHOST_USER.SET_VRING_KICK) this.setKick(q, fd);
        else if (m.request === VHOST_USER.SET_VRING_CALL) {
          if (q.callFd >= 0) closeFd(q.callFd);
          q.callFd = fd;
        } else {
          if (q.errFd >= 0) closeFd(q.errFd);
          q.errFd = fd;
        }
        return undefined;
      }
      case VHOST_USER.SET_VRING_ENABLE: {
        need(8);
        const q = this.queueOf(p.getUint32(0, true));
        q.enabled = p.getUint32(4, true) !== 0;
        if (q.enabled) this.process(q);
        return undefined;
      }
      case VHOST_USER.GET_CONFIG: {
        need(12);
        const offset = p.getUint32(0, true);
        const size = p.getUint32(4, true);
        if (offset + size > BLK_CONFIG_SIZE || p.byteLength < 12 + size) {
          throw badMessage(`GET_CONFIG of ${size} bytes at ${offset}`);
        }
        const config = encodeBlkConfig({
          capacitySectors: BigInt(Math.floor(this.dev.target.size() / SECTOR_SIZE)),
          blkSize: this.dev.blkSize,
          numQueues: this.queues.length,
          writeback: this.dev.cache.wce,
        });
        const out = new Uint8Array(12 + size);
        out.set(new Uint8Array(p.buffer, 0, 12));
        out.set(config.subarray(offset, offset + size), 12);
        return out;
      }
      case VHOST_USER.SET_CONFIG: {
        // The guest may write only the writeback byte (CONFIG_WCE); as qemu-storage-daemon,
        // anything else is ignored.
        need(12);
        const offset = p.getUint32(0, true);
        const size = p.getUint32(4, true);
        if (offset === BLK_CONFIG_WRITEBACK_OFFSET && size === 1 && p.byteLength >= 13) {
          this.dev.cache.wce = p.getUint8(12) !== 0;
          this.dev.cache.writeback = this.dev.cache.wce;
        }
        return undefined;
      }
      default:
        for (const fd of m.fds) closeFd(fd);
        throw badMessage(`unsupported request ${m.request}`);
    }
  }

  private setMemTable(p: DataView, fds: number[]): void {
    const n = p.byteLength >= 8 ? p.getUint32(0, true) : -1;
    if (n < 1 || n > MAX_MEM_REGIONS || p.byteLength < 8 + 32 * n || fds.length !== n) {
      throw badMessage(`SET_MEM_TABLE of ${n} regions with ${fds.length} fds`);
    }
    const descs: MemoryRegionDesc[] = [];
    for (let i = 0; i < n; i++) {
      const at = 8 + 32 * i;
      descs.push({
        guestPhysAddr: p.getBigUint64(at, true),
        size: p.getBigUint64(at + 8, true),
        userAddr: p.getBigUint64(at + 16, true),
        mmapOffset: p.getBigUint64(at + 24, true),
      });
    }
    const table = new MemoryTable(descs, fds.splice(0));
    const old = this.memory;
    this.memory = table;
    table.acquire(); // the connection's own hold, until replaced or closed
    for (const q of this.queues) if (q.ready) q.attach(table);
    if (old) {
      old.release();
      old.close();
    }
  }

  private setKick(q: Virtqueue, fd: number): void {
    this.stopQueue(q);
    if (q.kickFd >= 0) closeFd(q.kickFd);
    q.kickFd = fd;
    if (fd < 0) return; // polling mode: not offered (no inband notifications)
    if (!this.memory) throw badMessage(`vring ${q.index}: kick before SET_MEM_TABLE`);
    q.attach(this.memory);
    this.kickPolls.set(
      q.index,
      pollHandle(fd, () => {
        eventfdRead(fd);
        this.process(q);
      }),
    );
    // Buffers may be there already (a reconnect, or a guest that did not kick).
    this.process(q);
  }

  private stopQueue(q: Virtqueue): void {
    this.kickPolls.get(q.index)?.close();
    this.kickPolls.delete(q.index);
  }

  /** Starts every available request of the queue. */
  private process(q: Virtqueue): void {
    if (this.broken || this.closing || !q.enabled || !this.kickPolls.has(q.index)) return;
    const memory = this.memory!;
    try {
      for (let el = q.pop(); el; el = q.pop()) {
        if (!el.lastInMapped) {
          throw new VhostUserError(
            'ERR_VMDISK_VHOST_DEVICE_BROKEN',
            `vring ${q.index}: request without a writable status byte`,
          );
        }
        q.begin();
        memory.acquire();
        void this.run(q, el, memory);
      }
    } catch (e) {
      this.fail(
        e instanceof VhostUserError
          ? e
          : new VhostUserError('ERR_VMDISK_VHOST_DEVICE_BROKEN', String(e), { cause: e }),
      );
    }
  }

  /**
   * One request, returned to the guest when done. An async method rather than a `then` with
   * two closures: one allocation less per request, on the path every I/O takes.
   */
  private async run(q: Virtqueue, el: VirtqElement, memory: MemoryTable): Promise<void> {
    try {
      q.push(el.head, await processBlkRequest(this.dev, el));
    } catch {
      // processBlkRequest answers every failure with a status: nothing reaches here.
    } finally {
      memory.release();
      q.end();
    }
  }

  /** The device is unusable (a broken guest, a bad message): log, and disconnect. */
  private fail(err: VhostUserError): void {
    if (this.broken) return;
    this.broken = true;
    this.dev.onError(err);
    void this.close();
  }

  private async reset(): Promise<void> {
    for (const q of this.queues) this.stopQueue(q);
    await Promise.all(this.queues.map((q) => q.drained()));
    for (const q of this.queues) {
      q.detach();
      for (const fd of [q.kickFd, q.callFd, q.errFd]) if (fd >= 0) closeFd(fd);
      q.kickFd = q.callFd = q.errFd = -1;
      q.num = 0;
      q.addrs = undefined;
      q.lastAvailIdx = 0;
      q.enabled = true;
    }
    this.features = 0n;
    if (this.memory) {
      this.memory.release();
      this.memory.close();
      this.memory = undefined;
    }
  }

  /** Stops: queues stopped, requests in flight finished, memory unmapped, socket closed. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.poll.close();
      await this.reset();
      for (const fd of this.fds.splice(0)) closeFd(fd);
      for (const m of this.queue.splice(0)) for (const fd of m.fds) closeFd(fd);
      closeFd(this.fd);
      this.markClosed();
    })();
    return this.closing;
  }
}

function u64(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
}

function vringState(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return b;
}
