// The engine's contract: the options, the Engine and EngineFile interfaces its callers see
// (engine.ts implements them).

export type BackendName = 'io_uring' | 'aio' | 'threadpool';

export interface EngineOptions {
  /** 'auto' (default) honours VMDISK_ENGINE, else picks io_uring, aio, threadpool. */
  backend?: BackendName | 'auto';
  /** Submission queue entries (io_uring; the CQ gets twice as many) or AIO context size.
   * Default 128. More requests than the queue holds wait in the engine, never fail. */
  queueDepth?: number;
}

export interface OpenFileOptions {
  /** Open O_RDONLY (default: read-write). */
  readOnly?: boolean;
  /** Open O_DIRECT: every request must then be aligned to `logicalBlockSize`. */
  direct?: boolean;
  /** Create the file if it does not exist. */
  create?: boolean;
  /**
   * SEEK_DATA/SEEK_HOLE (seekData, seekHole) made on the calling thread where the
   * filesystem looks them up in its extent tree (ext4, XFS, btrfs), as QEMU's file driver
   * does: a thread-pool round trip costs more than the call (`vm-disk convert` of a raw
   * image with a thousand data extents: ~0.1 s of 0.5). Elsewhere (tmpfs walks its page
   * cache; network and FUSE filesystems ask a server) they stay on the thread pool. For a
   * process whose event loop serves nothing else meanwhile (an image tool); default false.
   */
  inlineSeeks?: boolean;
}

export type FallocateMode = 'allocate' | 'punch-hole' | 'zero-range';

export interface Engine {
  readonly backend: BackendName;
  openFile(path: string, options?: OpenFileOptions): Promise<EngineFile>;
  /** Page-aligned Buffer from the engine's arena, usable for O_DIRECT; no per-request
   * malloc. */
  allocBuffer(length: number): Buffer;
  /** Gives a buffer from allocBuffer back to the arena. Precondition: no request using
   * it is in flight, and the caller no longer touches it. */
  releaseBuffer(buf: Buffer): void;
  /** Whether `buf` is a Buffer allocBuffer handed out (that very object), not given back. */
  ownsBuffer(buf: Uint8Array): boolean;
  /** Refuses new work, waits for in-flight I/O, closes the files opened through this
   * engine that are still open, and releases ring, waiter and memory. */
  close(): Promise<void>;
}

/**
 * A file opened through an engine. Every method returns a promise and never throws:
 * bad arguments, misaligned O_DIRECT requests and closed files/engines give rejected
 * promises (EngineError with a stable code), system errors give IoError.
 */
export interface EngineFile {
  readonly path: string;
  readonly fd: number;
  readonly direct: boolean;
  readonly readOnly: boolean;
  /** The alignment O_DIRECT needs (offset, length, buffer address), e.g. 512 or 4096. */
  readonly logicalBlockSize: number;
  /**
   * Whether `buf`'s address suits this file: always without O_DIRECT; with it, aligned to
   * logicalBlockSize (allocBuffer's are). Lets a caller bounce a buffer up front instead of
   * catching MISALIGNED.
   */
  bufferAligned(buf: Uint8Array): boolean;
  size(): Promise<number>;
  /** Bytes read; fewer than buf.length only at EOF. */
  read(buf: Uint8Array, offset: number): Promise<number>;
  /** All of buf, or an IoError. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  readv(bufs: Uint8Array[], offset: number): Promise<number>;
  writev(bufs: Uint8Array[], offset: number): Promise<void>;
  fsync(): Promise<void>;
  fdatasync(): Promise<void>;
  /** punch-hole keeps the size (PUNCH_HOLE|KEEP_SIZE); zero-range is ZERO_RANGE. */
  fallocate(mode: FallocateMode, offset: number, length: number): Promise<void>;
  truncate(size: number): Promise<void>;
  /**
   * Copies `length` bytes at `offset` to `dest` at `destOffset` in the kernel
   * (copy_file_range, on the thread pool): no buffer, one copy in the page cache or none
   * where the file system shares extents. Resolves the bytes copied: fewer than `length`
   * only at this file's end. An IoError when the kernel cannot (EXDEV: other file
   * systems, EOPNOTSUPP, EINVAL) or fails; the destination may then hold part of it.
   * Buffered files only: O_DIRECT on either side is refused (NOT_SUPPORTED), as the
   * kernel would go through the page cache behind the direct I/O.
   */
  copyTo(dest: EngineFile, offset: number, destOffset: number, length: number): Promise<number>;
  /** lseek SEEK_DATA: the next data offset at or after `offset`; null when none. */
  seekData(offset: number): Promise<number | null>;
  /** lseek SEEK_HOLE: the next hole offset at or after `offset`; null when none. */
  seekHole(offset: number): Promise<number | null>;
  /**
   * Takes ('shared', 'exclusive') or drops ('unlock') a byte-range lock on the file: an
   * open file description lock (F_OFD_SETLK), held by this open file until it is dropped or
   * the file closes. Synchronous, unlike the rest (it never waits): throws an IoError
   * (errnoName 'EAGAIN' when another open file holds a conflicting lock).
   */
  setLock(type: LockType, start: number, length: number): void;
  /**
   * Whether another open file holds a lock that conflicts with taking `type` on the range
   * (F_OFD_GETLK; 'exclusive' conflicts with any lock). Synchronous; throws an IoError.
   */
  lockConflicts(type: Exclude<LockType, 'unlock'>, start: number, length: number): boolean;
  /** Waits for this file's in-flight requests, then closes the fd. */
  close(): Promise<void>;
}

export type LockType = 'shared' | 'exclusive' | 'unlock';
