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
}

/**
 * A backing disk as the qcow2 core sees it: a read-only virtual disk of `size()` bytes
 * (another qcow2 image, a raw file, a graph node). Reads are within [0, size()).
 */
export interface Qcow2BackingReader {
  read(buf: Uint8Array, offset: number): Promise<unknown>;
  size(): Promise<number>;
}
