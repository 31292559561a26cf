// An ExportTarget over a file or block device. Reads go through this thread's shared
// @vmdisk/engine (io_uring where the kernel has it): submitted from the event loop, a
// page-cache hit completes in the enter call, no libuv thread-pool thread taken. Writes
// stay on libuv's thread pool (fs.write on the same fd): io_uring hands a buffered write
// on ext4 to a kernel worker, one at a time per file, and that measured 2-3x slower than
// the pool's four threads (random 4 KiB writes, bench/nbd.bench.ts). No allocBuffer: the
// server's own buffers (a view of the received bytes for a write, one buffer for a read
// reply's header and data) measured faster than copying through arena memory. It reports
// no block status (the server then reports all of it as data) and leaves write-zeroes to
// the server's emulation.

import * as fs from 'node:fs';
import { type EngineFile, sharedEngine } from '@vmdisk/engine';
import { NbdError, NbdSystemError } from '../errors.ts';
import type { BlockSizeConstraints, ExportTarget, WriteFlags } from '../export-target.ts';
import { MAX_PAYLOAD_BYTES } from '../protocol.ts';

export interface FileTargetOptions {
  /** Open read-only (no write, no flush of writes). Default false. */
  readOnly?: boolean;
}

/** The engine's IoError carries errnoName; NbdSystemError reads a Node-style `code`. */
const fileError = (what: string, err: unknown): NbdSystemError => {
  const e = err as { errnoName?: unknown; errno?: unknown; syscall?: unknown; message?: unknown };
  const cause =
    typeof e?.errnoName === 'string'
      ? { code: e.errnoName, errno: e.errno, syscall: e.syscall, message: e.message, cause: err }
      : err;
  return new NbdSystemError('ERR_VMDISK_NBD_FILE_ERROR', what, cause);
};

const writeAll = (fd: number, buf: Uint8Array, offset: number): Promise<void> =>
  new Promise((resolve, reject) => {
    let done = 0;
    const next = (): void => {
      fs.write(fd, buf, done, buf.length - done, offset + done, (err, n) => {
        if (err) return reject(fileError(`write at ${offset + done}`, err));
        done += n;
        if (done < buf.length) next();
        else resolve();
      });
    };
    next();
  });

const fstat = (fd: number): Promise<fs.Stats> =>
  new Promise((resolve, reject) => {
    fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st)));
  });

export class FileTarget implements ExportTarget {
  readonly path: string;
  readonly readOnly: boolean;
  readonly nativeFua = false;
  readonly multiConnSafe = true;
  readonly blockSize: BlockSizeConstraints = {
    minimum: 1,
    preferred: 4096,
    maximum: MAX_PAYLOAD_BYTES,
  };
  private readonly file: EngineFile;
  private readonly bytes: number;
  declare write?: (offset: number, buf: Uint8Array, flags: WriteFlags) => Promise<void>;

  private constructor(path: string, file: EngineFile, size: number, readOnly: boolean) {
    this.path = path;
    this.file = file;
    this.bytes = size;
    this.readOnly = readOnly;
    if (!readOnly) {
      this.write = (offset, buf) => writeAll(file.fd, buf, offset);
    }
  }

  /** Opens a file (or block device); its size is taken once, now. */
  static async open(path: string, options: FileTargetOptions = {}): Promise<FileTarget> {
    const readOnly = options.readOnly ?? false;
    const engine = await sharedEngine();
    let file: EngineFile;
    try {
      file = await engine.openFile(path, { readOnly });
    } catch (err) {
      throw fileError(`cannot open ${path}`, err);
    }
    let st: fs.Stats;
    try {
      st = await fstat(file.fd);
    } catch (err) {
      await file.close().catch(() => {});
      throw fileError(`cannot stat ${path}`, err);
    }
    if (!st.isFile() && !st.isBlockDevice()) {
      await file.close().catch(() => {});
      throw new NbdError('ERR_VMDISK_NBD_INVALID_ARGUMENT', `${path}: not a file or block device`);
    }
    // A block device's st_size is 0: its size is where its end is.
    const size = st.isFile() ? st.size : await file.size();
    return new FileTarget(path, file, size, readOnly);
  }

  size(): number {
    return this.bytes;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.file.read(buf, offset).then(
      (n) => {
        // Past the end of the file (it shrank): reads as zeros.
        if (n < buf.length) buf.fill(0, n);
      },
      (err: unknown) => {
        throw fileError(`read at ${offset}`, err);
      },
    );
  }

  flush(): Promise<void> {
    return this.file.fdatasync().catch((err: unknown) => {
      throw fileError('fdatasync', err);
    });
  }

  /** Closes the file; the target must not be used afterwards. */
  close(): Promise<void> {
    return this.file.close().catch((err: unknown) => {
      throw fileError('close', err);
    });
  }
}
