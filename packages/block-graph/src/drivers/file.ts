// The `file` protocol driver: a host file through @vmdisk/engine (io_uring, Linux AIO or
// the thread pool), O_DIRECT with cache.direct, discard by punching holes, write-zeroes by
// punching or zeroing ranges, block status by SEEK_DATA/SEEK_HOLE; image locks as QEMU's
// (file-lock.ts) for the permissions its parents hold, unless locking=off.

import { type EngineFile, pagesCached } from '@vmdisk/engine';
import {
  defineDriver,
  type EngineLike,
  type FileRange,
  type ProtocolInstance,
  type ProtocolStatus,
} from '../driver.ts';
import { BlockError, BlockErrorCode, toBlockError } from '../errors.ts';
import { enumOf, opt, str } from '../schema.ts';
import { FileLocks } from './file-lock.ts';

/** QEMU's aio names and the engine's backend names. */
const AIO_NAMES = ['auto', 'io_uring', 'aio', 'native', 'threadpool', 'threads'] as const;
const AIO: Record<(typeof AIO_NAMES)[number], 'io_uring' | 'aio' | 'threadpool' | 'auto'> = {
  auto: 'auto',
  io_uring: 'io_uring',
  aio: 'aio',
  native: 'aio',
  threadpool: 'threadpool',
  threads: 'threadpool',
};

/** What copy_file_range answers where it cannot copy between two files (not a failure). */
const CANNOT_COPY = new Set(['EXDEV', 'EOPNOTSUPP', 'ENOSYS', 'EINVAL']);

class FileInstance implements ProtocolInstance {
  readonly kind = 'protocol';
  readonly limits: { requestAlignment: number };
  private unsupportedZero = false;
  /**
   * The last data region SEEK_DATA/SEEK_HOLE found: on tmpfs SEEK_HOLE walks the page cache
   * up to the next hole (O(file size) in a fully written file), and a copy asking per chunk
   * went quadratic. Answering data is always safe, so only punching or truncating drops it.
   */
  private dataCache: { start: number; end: number } | undefined;
  /**
   * Where the last hole's SEEK_DATA found data: a walk asks there next, and SEEK_DATA
   * would only answer the offset again (each seek is a thread hop: a third of a raw
   * source's seeks in a convert). Dropped as dataCache is.
   */
  private dataStart: number | undefined;

  private readonly file: EngineFile;
  private length: number;
  private readonly node: string;
  private readonly engine: EngineLike;
  private readonly locks: FileLocks | undefined;

  constructor(
    file: EngineFile,
    length: number,
    node: string,
    engine: EngineLike,
    locking: boolean,
  ) {
    this.file = file;
    this.length = length;
    this.node = node;
    this.engine = engine;
    this.limits = { requestAlignment: file.direct ? file.logicalBlockSize : 1 };
    if (locking) this.locks = new FileLocks(file, file.path);
  }

  checkPerm(perm: number, shared: number): void {
    this.locks?.check(perm, shared);
  }

  setPerm(perm: number, shared: number): void {
    this.locks?.commit(perm, shared);
  }

  abortPerm(): void {
    this.locks?.abort();
  }

  size(): number {
    return this.length;
  }

  /** This file's fd, for bytes that are all in the page cache (not with direct I/O); in bounds. */
  fileRange(offset: number, length: number): FileRange | undefined {
    const f = this.file;
    return f.direct || !pagesCached(f.fd, offset, length) ? undefined : { fd: f.fd, offset };
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    if (!this.file.bufferAligned(buf)) return this.bounceRead(buf, offset);
    return this.file.read(buf, offset).then(
      (n) => {
        // Short only at EOF (the file shrank under us): what is past it reads as zeros.
        if (n < buf.byteLength) buf.fill(0, n);
      },
      (err: unknown) => {
        throw toBlockError(err, this.node);
      },
    );
  }

  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.byteLength;
    const p = this.file.bufferAligned(buf)
      ? this.file.write(buf, offset).catch((err: unknown) => {
          throw toBlockError(err, this.node);
        })
      : this.bounceWrite(buf, offset);
    if (end <= this.length) return p;
    return p.then(() => {
      if (end > this.length) this.length = end;
    });
  }

  /**
   * copy_file_range from another file node's file (buffered, both): no buffer, and no
   * copy at all where the file system shares extents. False where the kernel cannot
   * between these two (EXDEV: other file systems, EOPNOTSUPP, EINVAL) or the source ends
   * first: the caller then reads and writes, over whatever part was copied.
   */
  async copyFrom(
    src: ProtocolInstance,
    srcOffset: number,
    offset: number,
    length: number,
  ): Promise<boolean> {
    if (!(src instanceof FileInstance) || src.file.direct || this.file.direct) return false;
    let n: number;
    try {
      n = await src.file.copyTo(this.file, srcOffset, offset, length);
    } catch (err) {
      const errno = (err as { errnoName?: string }).errnoName;
      if (errno !== undefined && CANNOT_COPY.has(errno)) return false;
      throw toBlockError(err, this.node);
    }
    if (n < length) return false;
    if (offset + length > this.length) this.length = offset + length;
    return true;
  }

  async truncate(size: number): Promise<void> {
    this.dataCache = undefined;
    this.dataStart = undefined;
    try {
      await this.file.truncate(size);
      this.length = size;
    } catch (err) {
      throw toBlockError(err, this.node);
    }
  }

  // O_DIRECT with a buffer whose address is not aligned (not engine arena memory; offset and
  // length are aligned by the generic layer, so only the address can be wrong): go through
  // an arena buffer.
  private async bounceRead(buf: Uint8Array, offset: number): Promise<void> {
    const bounce = this.engine.allocBuffer(buf.byteLength);
    try {
      const n = await this.file.read(bounce, offset);
      buf.set(bounce.subarray(0, n));
      if (n < buf.byteLength) buf.fill(0, n);
    } catch (err) {
      throw toBlockError(err, this.node);
    } finally {
      this.engine.releaseBuffer(bounce);
    }
  }

  private async bounceWrite(buf: Uint8Array, offset: number): Promise<void> {
    const bounce = this.engine.allocBuffer(buf.byteLength);
    try {
      bounce.set(buf);
      await this.file.write(bounce, offset);
    } catch (err) {
      throw toBlockError(err, this.node);
    } finally {
      this.engine.releaseBuffer(bounce);
    }
  }

  async flush(): Promise<void> {
    try {
      await this.file.fdatasync();
    } catch (err) {
      throw toBlockError(err, this.node);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.dropDataCache(offset, length);
    try {
      await this.file.fallocate('punch-hole', offset, length);
    } catch (err) {
      const e = toBlockError(err, this.node);
      // A file system without hole punching: discard is advisory.
      if (e.errnoName !== 'EOPNOTSUPP' && e.errnoName !== 'ENOTSUP') throw e;
    }
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    if (this.unsupportedZero) {
      throw new BlockError(BlockErrorCode.NOT_SUPPORTED, 'zero-range is not supported here');
    }
    this.dropDataCache(offset, length);
    try {
      await this.file.fallocate(mayUnmap ? 'punch-hole' : 'zero-range', offset, length);
    } catch (err) {
      const e = toBlockError(err, this.node);
      if (e.errnoName === 'EOPNOTSUPP' || e.errnoName === 'ENOTSUP') {
        if (!mayUnmap) this.unsupportedZero = true;
        throw new BlockError(BlockErrorCode.NOT_SUPPORTED, e.message, { cause: e });
      }
      throw e;
    }
  }

  private dropDataCache(offset: number, length: number): void {
    const c = this.dataCache;
    if (c && offset < c.end && offset + length > c.start) this.dataCache = undefined;
    const d = this.dataStart;
    if (d !== undefined && offset <= d && d < offset + length) this.dataStart = undefined;
  }

  async blockStatus(offset: number, length: number): Promise<ProtocolStatus> {
    const end = offset + length;
    const c = this.dataCache;
    if (c && offset >= c.start && offset < c.end) {
      return { length: Math.min(c.end, end) - offset, hole: false, zero: false };
    }
    try {
      const data = offset === this.dataStart ? offset : await this.file.seekData(offset);
      if (data !== null && data > offset) this.dataStart = data;
      if (data === null || data >= end) return { length, hole: true, zero: true };
      if (data > offset) return { length: data - offset, hole: true, zero: true };
      const hole = await this.file.seekHole(offset);
      if (hole !== null && hole > offset) this.dataCache = { start: offset, end: hole };
      const stop = hole === null ? end : Math.min(hole, end);
      return { length: Math.max(stop - offset, 1), hole: false, zero: false };
    } catch (err) {
      const e = toBlockError(err, this.node);
      if (e.errnoName === 'EINVAL' || e.errnoName === 'ENXIO' || e.errnoName === 'EOPNOTSUPP') {
        return { length, hole: false, zero: false };
      }
      throw e;
    }
  }

  async close(): Promise<void> {
    await this.file.close();
  }

  info(): Record<string, unknown> {
    return { file: this.file.path, aio: this.engine.backend, fd: this.file.fd };
  }
}

export const fileDriver = defineDriver({
  name: 'file',
  // The open mode (read-only, O_DIRECT) is the fd's: a reopen opens the file again.
  reopen: { instance: true },
  options: {
    filename: str,
    // QEMU's: auto takes the locks where open file description locks exist (Linux), as on.
    locking: opt(enumOf(['auto', 'on', 'off'])),
    aio: opt(enumOf(AIO_NAMES)),
  },
  async open(ctx) {
    const { filename } = ctx.options;
    const backend = AIO[ctx.options.aio ?? 'auto'];
    try {
      const engine = await ctx.engine(backend);
      const how = { direct: ctx.direct, inlineSeeks: ctx.inlineSeeks };
      let file: EngineFile;
      try {
        file = await engine.openFile(filename, { readOnly: ctx.readOnly, ...how });
      } catch (err) {
        const name = (err as { errnoName?: string }).errnoName;
        const denied = name === 'EACCES' || name === 'EPERM' || name === 'EROFS';
        if (ctx.readOnly || !ctx.autoReadOnly || !denied) throw err;
        file = await engine.openFile(filename, { readOnly: true, ...how });
        ctx.setReadOnly();
      }
      try {
        const size = await file.size();
        const locking = ctx.options.locking !== 'off';
        return new FileInstance(file, size, ctx.nodeName, engine, locking);
      } catch (err) {
        await file.close();
        throw err;
      }
    } catch (err) {
      throw toBlockError(err, ctx.nodeName);
    }
  },
});
