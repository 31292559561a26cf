// An ExportTarget over a file or block device: opened here and read and written with
// node:fs's callback APIs (fs.read, fs.write, fs.fdatasync on libuv's thread pool), or a
// file the embedder opened with an I/O layer of its own (fromFile: e.g. @vmdisk/engine's
// EngineFile, on io_uring). It reports no block status (the server then reports all of it
// as data) and leaves write-zeroes to the server's emulation.

import * as fs from 'node:fs';
import { NbdError, NbdSystemError } from '../errors.ts';
import type { BlockSizeConstraints, ExportTarget, WriteFlags } from '../export-target.ts';
import { MAX_PAYLOAD_BYTES } from '../protocol.ts';

export interface FileTargetOptions {
  /** Open read-only (no write, no flush of writes). Default false. */
  readOnly?: boolean;
}

const fileError = (what: string, err: unknown): NbdSystemError =>
  new NbdSystemError('ERR_VMDISK_NBD_FILE_ERROR', what, err);

const readAll = (fd: number, buf: Uint8Array, offset: number): Promise<void> =>
  new Promise((resolve, reject) => {
    let done = 0;
    const next = (): void => {
      fs.read(fd, buf, done, buf.length - done, offset + done, (err, n) => {
        if (err) return reject(fileError(`read at ${offset + done}`, err));
        if (n === 0) {
          // Past the end of the file (it shrank): reads as zeros.
          buf.fill(0, done);
          return resolve();
        }
        done += n;
        if (done < buf.length) next();
        else resolve();
      });
    };
    next();
  });

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

/**
 * A file open elsewhere, for FileTarget.fromFile: @vmdisk/engine's EngineFile has this
 * shape. A buffered file: the server's request buffers have no particular alignment.
 * Its errors reach the client as they are (an errno name in `errnoName` or `code`).
 */
export interface TargetFile {
  readonly path: string;
  readonly readOnly: boolean;
  size(): Promise<number>;
  /** Bytes read: fewer than buf.length only at the end of the file. */
  read(buf: Uint8Array, offset: number): Promise<number>;
  /** All of buf. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  fdatasync(): Promise<void>;
  close(): Promise<void>;
}

/** What a FileTarget reads and writes through: node:fs on an fd, or a TargetFile. */
interface FileIo {
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, buf: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** node:fs on `fd` (libuv's thread pool). */
function fsIo(fd: number): FileIo {
  return {
    read: (offset, buf) => readAll(fd, buf, offset),
    write: (offset, buf) => writeAll(fd, buf, offset),
    flush: () =>
      new Promise((resolve, reject) => {
        fs.fdatasync(fd, (err) => (err ? reject(fileError('fdatasync', err)) : resolve()));
      }),
    close: () =>
      new Promise((resolve, reject) => {
        fs.close(fd, (err) => (err ? reject(fileError('close', err)) : resolve()));
      }),
  };
}

/** A TargetFile; what lies past its end (it shrank) reads as zeros. */
function fileIo(file: TargetFile): FileIo {
  return {
    read: (offset, buf) =>
      file.read(buf, offset).then((n) => {
        if (n < buf.byteLength) buf.fill(0, n);
      }),
    write: (offset, buf) => file.write(buf, offset),
    flush: () => file.fdatasync(),
    close: () => file.close(),
  };
}

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
  private readonly io: FileIo;
  private closing: Promise<void> | undefined;
  private readonly bytes: number;
  declare write?: (offset: number, buf: Uint8Array, flags: WriteFlags) => Promise<void>;

  private constructor(path: string, io: FileIo, size: number, readOnly: boolean) {
    this.path = path;
    this.io = io;
    this.bytes = size;
    this.readOnly = readOnly;
    if (!readOnly) {
      this.write = (offset, buf) => io.write(offset, buf);
    }
  }

  /**
   * A target over a file the caller opened (e.g. an @vmdisk/engine EngineFile, so that
   * requests go through io_uring rather than libuv's thread pool); its size is taken once,
   * now. close() closes the file.
   */
  static async fromFile(file: TargetFile): Promise<FileTarget> {
    return new FileTarget(file.path, fileIo(file), await file.size(), file.readOnly);
  }

  /** Opens a file (or block device); its size is taken once, now. */
  static open(path: string, options: FileTargetOptions = {}): Promise<FileTarget> {
    const readOnly = options.readOnly ?? false;
    return new Promise((resolve, reject) => {
      fs.open(path, readOnly ? 'r' : 'r+', (err, fd) => {
        if (err) return reject(fileError(`cannot open ${path}`, err));
        fs.fstat(fd, (statErr, st) => {
          if (statErr) {
            fs.close(fd, () => reject(fileError(`cannot stat ${path}`, statErr)));
            return;
          }
          if (!st.isFile() && !st.isBlockDevice()) {
            fs.close(fd, () =>
              reject(
                new NbdError(
                  'ERR_VMDISK_NBD_INVALID_ARGUMENT',
                  `${path}: not a file or block device`,
                ),
              ),
            );
            return;
          }
          resolve(new FileTarget(path, fsIo(fd), st.size, readOnly));
        });
      });
    });
  }

  size(): number {
    return this.bytes;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.io.read(offset, buf);
  }

  flush(): Promise<void> {
    return this.io.flush();
  }

  /** Closes the file (once); the target must not be used afterwards. */
  close(): Promise<void> {
    this.closing ??= this.io.close();
    return this.closing;
  }
}
