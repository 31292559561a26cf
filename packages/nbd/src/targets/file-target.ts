// An ExportTarget over a file or block device, with node:fs's callback APIs (fs.read,
// fs.write, fs.fdatasync on libuv's thread pool). It reports no block status (the server
// then reports all of it as data) and leaves write-zeroes to the server's emulation.

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
  private fd: number;
  private readonly bytes: number;
  declare write?: (offset: number, buf: Uint8Array, flags: WriteFlags) => Promise<void>;

  private constructor(path: string, fd: number, size: number, readOnly: boolean) {
    this.path = path;
    this.fd = fd;
    this.bytes = size;
    this.readOnly = readOnly;
    if (!readOnly) {
      this.write = (offset, buf) => writeAll(this.fd, buf, offset);
    }
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
          resolve(new FileTarget(path, fd, st.size, readOnly));
        });
      });
    });
  }

  size(): number {
    return this.bytes;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return readAll(this.fd, buf, offset);
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.fdatasync(this.fd, (err) => (err ? reject(fileError('fdatasync', err)) : resolve()));
    });
  }

  /** Closes the file; the target must not be used afterwards. */
  close(): Promise<void> {
    const fd = this.fd;
    this.fd = -1;
    return new Promise((resolve, reject) => {
      fs.close(fd, (err) => (err ? reject(fileError('close', err)) : resolve()));
    });
  }
}
