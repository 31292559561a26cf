// A sparse ExportTarget in memory: the export is cut into 64 KiB chunks that exist only
// once written. Block status and sparse reads come from what was written, zeroed or
// trimmed: a chunk never written (or trimmed, or zeroed whole) is a hole reading as zeros.

import { NbdError } from '../errors.ts';
import type {
  BlockSizeConstraints,
  ExportTarget,
  Extent,
  SparsePiece,
  WriteFlags,
  WriteZeroesFlags,
} from '../export-target.ts';
import { MAX_PAYLOAD_BYTES } from '../protocol.ts';

const CHUNK = 64 * 1024;
const ZERO_CHUNK = Buffer.alloc(CHUNK);

export class MemoryTarget implements ExportTarget {
  readonly nativeFua = true;
  readonly multiConnSafe = true;
  readonly blockSize: BlockSizeConstraints = {
    minimum: 1,
    preferred: 4096,
    maximum: MAX_PAYLOAD_BYTES,
  };
  private readonly bytes: number;
  private readonly chunks = new Map<number, Buffer>();

  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', `MemoryTarget size ${size}`);
    }
    this.bytes = size;
  }

  size(): number {
    return this.bytes;
  }

  /** Bytes held in allocated chunks. */
  get allocatedBytes(): number {
    return this.chunks.size * CHUNK;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.each(offset, buf.length, (index, at, n, done) => {
      const chunk = this.chunks.get(index);
      if (chunk === undefined) buf.fill(0, done, done + n);
      else buf.set(chunk.subarray(at, at + n), done);
    });
  }

  /** Chunks never written (or trimmed, or zeroed whole) are holes; the rest is data. */
  async readSparse(
    offset: number,
    length: number,
    alloc: (length: number) => Uint8Array,
  ): Promise<SparsePiece[]> {
    const runs: Array<{ offset: number; length: number; hole: boolean }> = [];
    this.each(offset, length, (index, at, n) => {
      const hole = !this.chunks.has(index);
      const last = runs[runs.length - 1];
      if (last !== undefined && last.hole === hole) last.length += n;
      else runs.push({ offset: index * CHUNK + at, length: n, hole });
    });
    const out: SparsePiece[] = [];
    for (const r of runs) {
      if (r.hole) {
        out.push({ offset: r.offset, length: r.length });
      } else {
        const data = alloc(r.length);
        await this.read(r.offset, data);
        out.push({ offset: r.offset, length: r.length, data });
      }
    }
    return out;
  }

  async write(offset: number, buf: Uint8Array, _flags: WriteFlags): Promise<void> {
    this.each(offset, buf.length, (index, at, n, done) => {
      this.chunk(index).set(buf.subarray(done, done + n), at);
    });
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    this.zero(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, flags: WriteZeroesFlags): Promise<void> {
    this.zero(offset, length, flags.noHole === true);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    this.each(offset, length, (index, at, n) => {
      const chunk = this.chunks.get(index);
      const hole = chunk === undefined;
      const zero = hole || chunk.subarray(at, at + n).equals(ZERO_CHUNK.subarray(0, n));
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === hole && last.zero === zero) last.length += n;
      else out.push({ length: n, hole, zero });
    });
    return out;
  }

  private zero(offset: number, length: number, keepAllocated: boolean): void {
    this.each(offset, length, (index, at, n) => {
      if (!keepAllocated && n === CHUNK) {
        this.chunks.delete(index);
        return;
      }
      const chunk = keepAllocated ? this.chunk(index) : this.chunks.get(index);
      chunk?.fill(0, at, at + n);
    });
  }

  private chunk(index: number): Buffer {
    let chunk = this.chunks.get(index);
    if (chunk === undefined) {
      chunk = Buffer.alloc(CHUNK);
      this.chunks.set(index, chunk);
    }
    return chunk;
  }

  /** Calls fn for each chunk piece of [offset, offset+length). */
  private each(
    offset: number,
    length: number,
    fn: (index: number, at: number, n: number, done: number) => void,
  ): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const at = pos - index * CHUNK;
      const n = Math.min(CHUNK - at, length - done);
      fn(index, at, n, done);
      done += n;
    }
  }
}
