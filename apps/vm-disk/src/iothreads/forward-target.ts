// The worker's side of the forward path: an ExportTarget whose every request is run by the
// main thread through the export's BlockBackend (bitmaps, filters, jobs and accounting all
// see it). Request buffers are SharedArrayBuffer-backed, so the data crosses threads
// without a copy.
import type {
  BlockSizeConstraints,
  BlockStatusOptions,
  ExportTarget,
  Extent,
  FileRange,
  WriteFlags,
  WriteZeroesFlags,
} from '@vmdisk/nbd';
import type { LocalReads } from './local-reads.ts';
import type { ForwardExtent, ForwardedError, ForwardOp } from './messages.ts';

/** Posts one forwarded request; resolves with the main thread's reply. */
export type Forward = (name: string, req: ForwardOp) => Promise<ForwardExtent[] | undefined>;

/** SharedArrayBuffer views by length, given back after use (bounded per length). */
class SharedBuffers {
  private readonly free = new Map<number, Uint8Array[]>();

  alloc(length: number): Uint8Array {
    return this.free.get(length)?.pop() ?? new Uint8Array(new SharedArrayBuffer(length));
  }

  release(buf: Uint8Array): void {
    if (!(buf.buffer instanceof SharedArrayBuffer) || buf.byteOffset !== 0) return;
    if (buf.byteLength !== buf.buffer.byteLength) return;
    let list = this.free.get(buf.byteLength);
    if (list === undefined) {
      list = [];
      this.free.set(buf.byteLength, list);
    }
    if (list.length < 64) list.push(buf);
  }
}

const isShared = (buf: Uint8Array): boolean => buf.buffer instanceof SharedArrayBuffer;

/** The error a target rejects with, from the main thread's. */
export function forwardedError(e: ForwardedError): Error {
  return Object.assign(new Error(e.message), { errnoName: e.errnoName ?? 'EIO' });
}

export class ForwardTarget implements ExportTarget {
  readonly nativeFua = true;
  readonly multiConnSafe = true;
  readonly reportsDepth = true;
  readonly blockSize: BlockSizeConstraints;
  private readonly name: string;
  private readonly bytes: number;
  private readonly forward: Forward;
  private readonly buffers = new SharedBuffers();
  /** READs served from the file here while the main thread allows it (the fast path). */
  readonly local: LocalReads;

  constructor(
    name: string,
    size: number,
    blockSize: BlockSizeConstraints,
    forward: Forward,
    local: LocalReads,
  ) {
    this.name = name;
    this.bytes = size;
    this.blockSize = blockSize;
    this.forward = forward;
    this.local = local;
  }

  // The NBD export's node cannot be resized while exported (the export unshares resize).
  size(): number {
    return this.bytes;
  }

  allocBuffer(length: number): Uint8Array {
    return this.buffers.alloc(length);
  }

  releaseBuffer(buf: Uint8Array): void {
    this.buffers.release(buf);
  }

  fileRange(offset: number, length: number): FileRange | undefined {
    return this.local.fileRange(offset, length);
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    const here = this.local.read(offset, buf);
    if (here !== undefined) return here;
    if (isShared(buf)) {
      await this.forward(this.name, { op: 'read', offset, buf });
      return;
    }
    const shared = this.buffers.alloc(buf.byteLength);
    try {
      await this.forward(this.name, { op: 'read', offset, buf: shared });
      buf.set(shared);
    } finally {
      this.buffers.release(shared);
    }
  }

  async write(offset: number, buf: Uint8Array, flags: WriteFlags): Promise<void> {
    const fua = flags.fua ?? false;
    if (isShared(buf)) {
      await this.forward(this.name, { op: 'write', offset, buf, fua });
      return;
    }
    const shared = this.buffers.alloc(buf.byteLength);
    shared.set(buf);
    try {
      await this.forward(this.name, { op: 'write', offset, buf: shared, fua });
    } finally {
      this.buffers.release(shared);
    }
  }

  async flush(): Promise<void> {
    await this.forward(this.name, { op: 'flush' });
  }

  async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    await this.forward(this.name, { op: 'trim', offset, length, fua: flags.fua ?? false });
  }

  async writeZeroes(offset: number, length: number, flags: WriteZeroesFlags): Promise<void> {
    await this.forward(this.name, {
      op: 'zero',
      offset,
      length,
      fua: flags.fua ?? false,
      noHole: flags.noHole ?? false,
      fastZero: flags.fastZero ?? false,
    });
  }

  async blockStatus(
    offset: number,
    length: number,
    options?: BlockStatusOptions,
  ): Promise<Extent[]> {
    // A READ only skips holes that are cheap to know: not worth a round trip here.
    if (options?.wantZero === false) return [{ length, hole: false, zero: false }];
    return (await this.forward(this.name, { op: 'status', offset, length })) ?? [];
  }
}
