// Reusable buffers for request payloads and read replies, so that a busy server does not
// allocate (and the GC free) one buffer per request: classes of a power of two from 4 KiB
// to 1 MiB plus 64 bytes (room for a reply header before a power-of-two payload), at most
// `maxBytes` kept. A buffer goes back only once nothing refers to it (its
// reply written to the kernel, its write completed); one the pool does not keep is
// detached, which frees its memory at once (the garbage collector may not run for long
// after a burst, and the memory would stay resident until it does).

const MIN_POWER = 4096;
/** Room for a reply header in front of a power-of-two payload. */
const SLACK = 64;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;
  private readonly maxBytes: number;
  private readonly maxClass: number;

  constructor(maxBytes = 16 * 1024 * 1024, maxClass = 1024 * 1024) {
    this.maxBytes = maxBytes;
    this.maxClass = maxClass;
  }

  /** ArrayBuffers this pool allocated: only those it may detach. */
  private readonly ours = new WeakSet<ArrayBufferLike>();

  /** A buffer of `length` bytes (contents undefined). */
  get(length: number): Buffer {
    if (length > this.maxClass + SLACK) return this.allocate(length);
    let power = MIN_POWER;
    while (power + SLACK < length) power *= 2;
    const size = power + SLACK;
    const whole = this.free.get(size)?.pop();
    if (whole !== undefined) {
      this.pooled -= size;
      return whole.subarray(0, length);
    }
    return this.allocate(size).subarray(0, length);
  }

  private allocate(size: number): Buffer {
    const buf = Buffer.allocUnsafeSlow(size);
    this.ours.add(buf.buffer);
    return buf;
  }

  /** Gives back a buffer that `get` returned; others are left to the GC. */
  put(buf: Uint8Array): void {
    const ab = buf.buffer;
    if (!this.ours.has(ab)) return;
    const size = ab.byteLength;
    const power = size - SLACK;
    if (
      buf.byteOffset !== 0 ||
      power < MIN_POWER ||
      power > this.maxClass ||
      (power & (power - 1)) !== 0 ||
      this.pooled + size > this.maxBytes
    ) {
      this.ours.delete(ab);
      // transfer() is ES2024.
      (ab as ArrayBuffer & { transfer(length: number): ArrayBuffer }).transfer(0);
      return;
    }
    let list = this.free.get(size);
    if (list === undefined) {
      list = [];
      this.free.set(size, list);
    }
    list.push(Buffer.from(buf.buffer as ArrayBuffer, 0, size));
    this.pooled += size;
  }
}
