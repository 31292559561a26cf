// The bytes a connection has received and not yet parsed: a list of the socket's chunks,
// read from the front without copying where a field lies inside one chunk.

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  /** Bytes held. */
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Removes and returns the first `n` bytes (n <= length); a view when they are contiguous. */
  take(n: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /** The first `n` bytes (n <= length), left in the queue; a view when contiguous. */
  peek(n: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.head >= n) {
      return first.subarray(this.head, this.head + n);
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    for (let i = 0; done < n; i++) {
      const c = this.chunks[i]!;
      const from = i === 0 ? this.head : 0;
      const count = Math.min(c.length - from, n - done);
      out.set(c.subarray(from, from + count), done);
      done += count;
    }
    return out;
  }

  /** Moves the first `n` bytes (n <= length) into `dst` at `at`. */
  copyInto(dst: Uint8Array, at: number, n: number): void {
    let done = 0;
    while (done < n) {
      const first = this.chunks[0]!;
      const count = Math.min(first.length - this.head, n - done);
      dst.set(first.subarray(this.head, this.head + count), at + done);
      done += count;
      this.advance(count);
    }
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    let done = 0;
    while (done < n && this.length > 0) {
      const first = this.chunks[0]!;
      const count = Math.min(first.length - this.head, n - done);
      done += count;
      this.advance(count);
    }
    return done;
  }

  /** Copies the bytes held into a buffer of the queue's own: the chunks pushed may be reused. */
  keep(): void {
    if (this.length === 0) return;
    const own = Buffer.allocUnsafe(this.length);
    this.copyInto(own, 0, own.length);
    this.push(own);
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }

  private advance(n: number): void {
    this.head += n;
    this.length -= n;
    if (this.head === this.chunks[0]!.length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}
