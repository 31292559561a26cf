// The I/O the qcow2 core needs from below: a subset of @vmdisk/engine's EngineFile.

/**
 * The image file. `read` returns the number of bytes read: fewer than asked only at the end
 * of the file. `write` writes everything or fails. Buffers handed to `write` are not touched
 * by the core until the promise settles.
 */
export interface Qcow2File {
  read(buf: Uint8Array, offset: number): Promise<number>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  size(): Promise<number>;
  truncate(size: number): Promise<void>;
  flush(): Promise<void>;
  /**
   * Optional: deallocates a range (punches a hole) whose content no longer matters; a
   * failure is ignored (discarding is advisory).
   */
  discard?(offset: number, length: number): Promise<void>;
  /**
   * Optional: memory for I/O to this file (a graph node's aligned allocator), so that
   * O_DIRECT needs no bounce; contents undefined. Given back with releaseBuffer.
   */
  allocBuffer?(length: number): Uint8Array;
  releaseBuffer?(buf: Uint8Array): void;
}

/** A zero-filled buffer for I/O to `file`: from its allocator when it has one. */
export function ioBuffer(file: Qcow2File, length: number): Uint8Array {
  const buf = file.allocBuffer?.(length);
  return buf ? buf.fill(0) : new Uint8Array(length);
}

/** Gives back a buffer from ioBuffer. */
export function releaseIoBuffer(file: Qcow2File, buf: Uint8Array): void {
  file.releaseBuffer?.(buf);
}

/**
 * A backing disk as the qcow2 core sees it: a read-only virtual disk of `size()` bytes
 * (another qcow2 image, a raw file, a graph node). Reads are within [0, size()).
 */
export interface Qcow2BackingReader {
  read(buf: Uint8Array, offset: number): Promise<unknown>;
  size(): Promise<number>;
}

export interface Qcow2OpenOptions {
  /** Open read-only (default false). */
  readOnly?: boolean;
  /**
   * The backing disk: a reader, or null for none (reads of unallocated clusters then give
   * zeros). Required (possibly null) when the header names a backing file.
   */
  backing?: Qcow2BackingReader | null;
  /** Bytes of L2 tables cached (QEMU's l2-cache-size); default: enough for the whole disk, at most 32 MiB. */
  l2CacheSize?: number;
  /** Bytes of refcount blocks cached (QEMU's refcount-cache-size); default 4 clusters' worth or 256 KiB. */
  refcountCacheSize?: number;
  /** Defer refcount updates under the dirty bit (default: the image's lazy_refcounts bit). */
  lazyRefcounts?: boolean;
  /** Pending freed clusters that trigger a metadata flush (default 1024). */
  discardBatch?: number;
  /**
   * The caller keeps the persistent bitmaps up to date (loads them, flags them in use,
   * stores them: bitmaps.ts): the bitmaps autoclear bit survives a read-write open.
   */
  keepBitmaps?: boolean;
}

/** Where the first bytes of a guest range live, for a map()-based caller (the graph). */
export interface Qcow2ReadMapping {
  /** Bytes from the asked offset this answer covers (> 0). */
  length: number;
  /** compressed: only readable through Qcow2Image.read (the data must be decompressed). */
  kind: 'data' | 'zero' | 'unallocated' | 'compressed';
  /** For data, and zero or unallocated (sub)clusters of an allocated cluster: the offset in the image file. */
  host?: number;
}

/**
 * Where a guest write goes, for a map()-based caller: write the bytes at `host` (for
 * `length` bytes from the asked offset). With `allocation`, the caller writes the whole
 * unit [start, end) of guest bytes to `host - (asked offset - start)` on, filling what lies
 * outside its write with what the range read as before (`from`: 'below' = the backing
 * disk, zeros past its end or without one; 'zero' = zeros), then calls commit() (or
 * abort() if that write failed). Exactly one of commit/abort must be called: until then
 * the clusters of the unit stay locked.
 */
export interface Qcow2WriteMapping {
  length: number;
  host: number;
  allocation: {
    start: number;
    end: number;
    from: 'below' | 'zero';
    commit(): Promise<void>;
    abort(error?: unknown): Promise<void>;
  };
}

/** One extent of block status. */
export interface Qcow2Extent {
  offset: number;
  length: number;
  /** data: in the image file; zero: reads as zeros; unallocated: from the backing (or zeros). */
  status: 'data' | 'zero' | 'unallocated';
  /** For data that is not compressed: where it is in the image file. */
  hostOffset?: number;
  compressed?: boolean;
}
