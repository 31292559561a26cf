// The engine: backend choice, files, argument and alignment checks (done here, once, so
// that backends do not re-check them), the buffer arena, and the lifecycle (close drains
// what is in flight, then releases the backend).
import * as fs from 'node:fs';
import { AioBackend } from './aio.ts';
import { BufferArena } from './arena.ts';
import type {
  BackendName,
  Engine,
  EngineFile,
  EngineOptions,
  FallocateMode,
  LockType,
  OpenFileOptions,
} from './engine-types.ts';
import { EngineError, ErrorCode, fromNodeError, IoError } from './errors.ts';
import { IoUringBackend } from './io-uring.ts';
import {
  addressOf,
  type BlockingIo,
  bufferedIoBlocks,
  copyFileRangeAsync,
  directAlignment,
  ENXIO,
  F_RDLCK,
  F_UNLCK,
  F_WRLCK,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  lseek,
  lseekAsync,
  ofdGetLock,
  ofdSetLock,
  SEEK_DATA,
  SEEK_END,
  SEEK_HOLE,
} from './native.ts';
import { type Backend, IoRequest, type OpKind } from './request.ts';
import { ThreadPoolBackend } from './threadpool.ts';

const LOCK_TYPES: Record<LockType, number> = {
  shared: F_RDLCK,
  exclusive: F_WRLCK,
  unlock: F_UNLCK,
};

const IOV_MAX = 1024;
const BACKENDS: readonly BackendName[] = ['io_uring', 'aio', 'threadpool'];

function invalid(message: string): EngineError {
  return new EngineError(ErrorCode.INVALID_ARGUMENT, message);
}

function checkOffset(what: string, offset: number): EngineError | null {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    return invalid(`${what}: offset must be a non-negative integer, got ${offset}`);
  }
  return null;
}

function checkLockRange(type: string, start: number, length: number): EngineError | null {
  if (!Object.hasOwn(LOCK_TYPES, type)) return invalid(`lock: unknown type '${type}'`);
  if (!Number.isSafeInteger(length) || length <= 0) {
    return invalid(`lock: length must be a positive integer, got ${length}`);
  }
  return checkOffset('lock', start);
}

/**
 * The closing of a file or an engine: refused at once (`closed`), finished (once, however
 * often close is called) when the last of its requests in flight has settled.
 */
class Closing {
  inFlight = 0;
  closed = false;
  private done: Promise<void> | null = null;
  private drained: (() => void) | null = null;

  issued(): void {
    this.inFlight++;
  }

  settled(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.drained) this.drained();
  }

  close(finish: () => Promise<void>): Promise<void> {
    if (this.done) return this.done;
    this.closed = true;
    this.done = (async () => {
      if (this.inFlight > 0) {
        await new Promise<void>((resolve) => {
          this.drained = resolve;
        });
      }
      await finish();
    })();
    return this.done;
  }
}

class EngineFileImpl implements EngineFile {
  readonly path: string;
  readonly fd: number;
  readonly direct: boolean;
  readonly readOnly: boolean;
  readonly logicalBlockSize: number;
  /** Which of its buffered requests always block in the kernel (ext4, tmpfs). */
  private readonly blocking: BlockingIo;
  /** SEEK_DATA/SEEK_HOLE made on the calling thread (OpenFileOptions.inlineSeeks). */
  private readonly inlineSeeks: boolean;
  private readonly closing = new Closing();
  private readonly engine: EngineImpl;
  /** Called once per request when it settles. */
  readonly settle = (_req: IoRequest): void => {
    this.engine.settled();
    this.closing.settled();
  };

  constructor(
    engine: EngineImpl,
    path: string,
    fd: number,
    direct: boolean,
    readOnly: boolean,
    align: number,
    inlineSeeks: boolean,
  ) {
    this.engine = engine;
    this.path = path;
    this.fd = fd;
    this.direct = direct;
    this.readOnly = readOnly;
    this.logicalBlockSize = align;
    const blocking = bufferedIoBlocks(fd);
    this.blocking = direct ? { ...blocking, reads: false, writes: false } : blocking;
    this.inlineSeeks = inlineSeeks && !blocking.seeks;
  }

  private refuse(): EngineError | null {
    if (this.closing.closed) {
      return new EngineError(ErrorCode.FILE_CLOSED, `file '${this.path}' is closed`);
    }
    return this.engine.refuse();
  }

  bufferAligned(buf: Uint8Array): boolean {
    return !this.direct || addressOf(buf) % this.logicalBlockSize === 0;
  }

  private misaligned(what: string, offset: number, bufs: Uint8Array[]): EngineError | null {
    if (!this.direct) return null;
    const a = this.logicalBlockSize;
    if (offset % a !== 0) {
      return new EngineError(
        ErrorCode.MISALIGNED,
        `${what} on O_DIRECT file '${this.path}': offset ${offset} is not a multiple of ${a}`,
      );
    }
    for (const b of bufs) {
      if (b.byteLength % a !== 0) {
        return new EngineError(
          ErrorCode.MISALIGNED,
          `${what} on O_DIRECT file '${this.path}': length ${b.byteLength} is not a multiple of ${a}`,
        );
      }
      if (addressOf(b) % a !== 0) {
        return new EngineError(
          ErrorCode.MISALIGNED,
          `${what} on O_DIRECT file '${this.path}': buffer address is not aligned to ${a} (use engine.allocBuffer)`,
        );
      }
    }
    return null;
  }

  private transfer(kind: OpKind, bufs: Uint8Array[], offset: number): Promise<number> {
    const err =
      this.refuse() ??
      checkOffset(kind, offset) ??
      (bufs.every((b) => b instanceof Uint8Array)
        ? null
        : invalid(`${kind}: buffers must be Uint8Arrays`)) ??
      (bufs.length > IOV_MAX ? invalid(`${kind}: at most ${IOV_MAX} buffers`) : null) ??
      this.misaligned(kind, offset, bufs);
    if (err) return Promise.reject(err);
    let length = 0;
    for (const b of bufs) length += b.byteLength;
    if (length === 0) return Promise.resolve(0);
    const nonEmpty = bufs.length === 1 ? bufs : bufs.filter((b) => b.byteLength > 0);
    return this.issue(kind, nonEmpty, offset, length, 0);
  }

  issue(
    kind: OpKind,
    bufs: Uint8Array[],
    offset: number,
    length: number,
    mode: number,
  ): Promise<number> {
    const backend = this.engine.be;
    this.closing.issued();
    this.engine.issued();
    return new Promise<number>((resolve, reject) => {
      const req = new IoRequest(
        backend,
        kind,
        this.fd,
        this.path,
        this.direct ? this.logicalBlockSize : 0,
        offset,
        bufs,
        length,
        mode,
        resolve,
        reject,
        this.settle,
      );
      if (kind === 'write' || kind === 'writev') req.blocks = this.blocking.writes;
      else if (kind === 'read' || kind === 'readv') req.blocks = this.blocking.reads;
      req.start();
    });
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    return this.transfer('read', [buf], offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.transfer('write', [buf], offset);
  }

  readv(bufs: Uint8Array[], offset: number): Promise<number> {
    if (!Array.isArray(bufs)) return Promise.reject(invalid('readv: bufs must be an array'));
    return this.transfer('readv', bufs, offset);
  }

  async writev(bufs: Uint8Array[], offset: number): Promise<void> {
    if (!Array.isArray(bufs)) throw invalid('writev: bufs must be an array');
    await this.transfer('writev', bufs, offset);
  }

  async fsync(): Promise<void> {
    const err = this.refuse();
    if (err) throw err;
    await this.issue('fsync', [], 0, 0, 0);
  }

  async fdatasync(): Promise<void> {
    const err = this.refuse();
    if (err) throw err;
    await this.issue('fdatasync', [], 0, 0, 0);
  }

  async fallocate(mode: FallocateMode, offset: number, length: number): Promise<void> {
    const err = this.refuse() ?? checkOffset('fallocate', offset);
    if (err) throw err;
    if (!Number.isSafeInteger(length) || length <= 0) {
      throw invalid(`fallocate: length must be a positive integer, got ${length}`);
    }
    let flags: number;
    if (mode === 'allocate') flags = 0;
    else if (mode === 'punch-hole') flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    else if (mode === 'zero-range') flags = FALLOC_FL_ZERO_RANGE;
    else throw invalid(`fallocate: unknown mode '${String(mode)}'`);
    await this.issue('fallocate', [], offset, length, flags);
  }

  async size(): Promise<number> {
    const err = this.refuse();
    if (err) throw err;
    const r = lseek(this.fd, 0, SEEK_END);
    if (r < 0) throw new IoError(-r, 'lseek', { path: this.path });
    return r;
  }

  async truncate(size: number): Promise<void> {
    const err = this.refuse() ?? checkOffset('truncate', size);
    if (err) throw err;
    await new Promise<void>((resolve, reject) => {
      fs.ftruncate(this.fd, size, (e) => {
        if (e) reject(fromNodeError(e, 'ftruncate', { path: this.path, length: size }));
        else resolve();
      });
    });
  }

  private async seek(offset: number, whence: number, what: string): Promise<number | null> {
    const err = this.refuse() ?? checkOffset(what, offset);
    if (err) throw err;
    const r = this.inlineSeeks
      ? lseek(this.fd, offset, whence)
      : await lseekAsync(this.fd, offset, whence);
    if (r === -ENXIO) return null;
    if (r < 0) throw new IoError(-r, 'lseek', { path: this.path, offset });
    return r;
  }

  async copyTo(
    dest: EngineFile,
    offset: number,
    destOffset: number,
    length: number,
  ): Promise<number> {
    const err =
      this.refuse() ??
      (dest instanceof EngineFileImpl ? dest.refuse() : invalid('copyTo: not an engine file')) ??
      checkOffset('copyTo', offset) ??
      checkOffset('copyTo', destOffset);
    if (err) throw err;
    if (!Number.isSafeInteger(length) || length < 0) {
      throw invalid(`copyTo: length must be a non-negative integer, got ${length}`);
    }
    if (this.direct || dest.direct) {
      throw new EngineError(ErrorCode.NOT_SUPPORTED, 'copyTo: not with O_DIRECT files');
    }
    const to = dest as EngineFileImpl;
    this.closing.issued();
    to.closing.issued();
    let done = 0;
    try {
      while (done < length) {
        const r = await copyFileRangeAsync(
          this.fd,
          offset + done,
          to.fd,
          destOffset + done,
          length - done,
        );
        if (r === 0) break; // the end of this file
        if (r < 0) {
          throw new IoError(-r, 'copy_file_range', {
            path: this.path,
            offset: offset + done,
            length: length - done,
          });
        }
        done += r;
      }
    } finally {
      this.closing.settled();
      to.closing.settled();
    }
    return done;
  }

  seekData(offset: number): Promise<number | null> {
    return this.seek(offset, SEEK_DATA, 'seekData');
  }

  seekHole(offset: number): Promise<number | null> {
    return this.seek(offset, SEEK_HOLE, 'seekHole');
  }

  setLock(type: LockType, start: number, length: number): void {
    // A closed file's locks went with it: dropping one is done already.
    if (type === 'unlock' && this.closing.closed) return;
    const err = this.refuse() ?? checkLockRange(type, start, length);
    if (err) throw err;
    const r = ofdSetLock(this.fd, LOCK_TYPES[type], start, length);
    if (r < 0) throw new IoError(-r, 'fcntl', { path: this.path, offset: start, length });
  }

  lockConflicts(type: Exclude<LockType, 'unlock'>, start: number, length: number): boolean {
    const err = this.refuse() ?? checkLockRange(type, start, length);
    if (err) throw err;
    const r = ofdGetLock(this.fd, LOCK_TYPES[type], start, length);
    if (r < 0) throw new IoError(-r, 'fcntl', { path: this.path, offset: start, length });
    return r !== F_UNLCK;
  }

  close(): Promise<void> {
    return this.closing.close(async () => {
      this.engine.forget(this);
      await new Promise<void>((resolve, reject) => {
        fs.close(this.fd, (e) => {
          if (e) reject(fromNodeError(e, 'close', { path: this.path }));
          else resolve();
        });
      });
    });
  }
}

function openFd(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(path, flags, 0o644, (e, fd) => {
      if (e) reject(fromNodeError(e, 'open', { path }));
      else resolve(fd);
    });
  });
}

class EngineImpl implements Engine {
  readonly backend: BackendName;
  readonly be: Backend;
  private readonly arena: BufferArena;
  private readonly files = new Set<EngineFileImpl>();
  private readonly closing = new Closing();

  constructor(be: Backend) {
    this.be = be;
    this.backend = be.name;
    this.arena = new BufferArena(
      be instanceof IoUringBackend
        ? { onSlab: (mem) => be.registerBuffer(mem), onDrop: (mem) => be.unregisterBuffer(mem) }
        : {},
    );
  }

  get isClosed(): boolean {
    return this.closing.closed;
  }

  refuse(): EngineError | null {
    return this.closing.closed
      ? new EngineError(ErrorCode.CLOSED, `the ${this.backend} engine is closed`)
      : null;
  }

  issued(): void {
    this.closing.issued();
  }

  settled(): void {
    this.closing.settled();
  }

  forget(file: EngineFileImpl): void {
    this.files.delete(file);
  }

  async openFile(path: string, options: OpenFileOptions = {}): Promise<EngineFile> {
    const err = this.refuse();
    if (err) throw err;
    if (typeof path !== 'string' || path.length === 0)
      throw invalid('openFile: path must be a non-empty string');
    const { O_RDONLY, O_RDWR, O_CREAT, O_DIRECT } = fs.constants;
    const readOnly = options.readOnly === true;
    const direct = options.direct === true;
    const flags =
      (readOnly ? O_RDONLY : O_RDWR) | (options.create ? O_CREAT : 0) | (direct ? O_DIRECT : 0);
    const fd = await openFd(path, flags);
    if (this.closing.closed) {
      fs.close(fd, () => {});
      throw this.refuse()!;
    }
    const align = directAlignment(fd);
    const inlineSeeks = options.inlineSeeks === true;
    const file = new EngineFileImpl(this, path, fd, direct, readOnly, align, inlineSeeks);
    this.files.add(file);
    return file;
  }

  allocBuffer(length: number): Buffer {
    const err = this.refuse();
    if (err) throw err;
    return this.arena.alloc(length);
  }

  releaseBuffer(buf: Buffer): void {
    this.arena.release(buf);
  }

  ownsBuffer(buf: Uint8Array): boolean {
    return this.arena.owns(buf);
  }

  close(): Promise<void> {
    return this.closing.close(async () => {
      const files = [...this.files];
      await Promise.allSettled(files.map((f) => f.close()));
      this.arena.dispose();
      this.be.destroy();
    });
  }
}

function createBackend(name: BackendName, queueDepth: number): Backend {
  switch (name) {
    case 'io_uring':
      return new IoUringBackend(queueDepth);
    case 'aio':
      return new AioBackend(queueDepth);
    case 'threadpool':
      return new ThreadPoolBackend();
  }
}

function requestedBackend(option: BackendName | 'auto' | undefined): BackendName | 'auto' {
  const choice = option ?? 'auto';
  if (choice !== 'auto' && !BACKENDS.includes(choice)) {
    throw invalid(`unknown engine backend '${String(choice)}' (io_uring, aio, threadpool or auto)`);
  }
  if (choice !== 'auto') return choice;
  const env = process.env.VMDISK_ENGINE;
  if (env === undefined || env === '' || env === 'auto') return 'auto';
  if (!BACKENDS.includes(env as BackendName)) {
    throw invalid(`VMDISK_ENGINE='${env}' is not io_uring, aio, threadpool or auto`);
  }
  return env as BackendName;
}

/** A new engine; 'auto' (default) honours VMDISK_ENGINE, else picks io_uring, aio,
 * threadpool (the first that works here). */
export async function openEngine(options: EngineOptions = {}): Promise<Engine> {
  const choice = requestedBackend(options.backend);
  const queueDepth = options.queueDepth ?? 128;
  if (!Number.isSafeInteger(queueDepth) || queueDepth < 1 || queueDepth > 4096) {
    throw invalid(`queueDepth must be an integer from 1 to 4096, got ${queueDepth}`);
  }
  const entries = 2 ** Math.ceil(Math.log2(queueDepth));
  if (choice !== 'auto') {
    try {
      return new EngineImpl(createBackend(choice, entries));
    } catch (cause) {
      throw new EngineError(
        ErrorCode.BACKEND_UNAVAILABLE,
        `the ${choice} engine backend cannot work here: ${(cause as Error).message}`,
        { cause },
      );
    }
  }
  for (const name of BACKENDS) {
    try {
      return new EngineImpl(createBackend(name, entries));
    } catch {
      // Try the next one; threadpool always works.
    }
  }
  throw new EngineError(ErrorCode.BACKEND_UNAVAILABLE, 'no engine backend works here');
}

const shared = new Map<string, Promise<Engine>>();
/** What 'auto' picked on this thread, by the VMDISK_ENGINE value it honoured. */
const autoPicks = new Map<string, BackendName>();

/** This JS thread's shared engine for a backend (created on first use, then the same
 * object; a new one once that one is closed). 'auto' and the backend it picks are one
 * engine: buffers from one are the other's registered buffers (READ/WRITE_FIXED: no
 * pinning of the pages per request).
 * Module state is per thread: a worker gets its own. */
export async function sharedEngine(backend: BackendName | 'auto' = 'auto'): Promise<Engine> {
  const env = process.env.VMDISK_ENGINE ?? '';
  const key = backend === 'auto' ? (autoPicks.get(env) ?? 'auto') : backend;
  const existing = shared.get(key);
  if (existing) {
    const e = await existing;
    if (!(e as EngineImpl).isClosed) return e;
    if (shared.get(key) === existing) shared.delete(key);
    return sharedEngine(backend);
  }
  const p = openEngine({ backend: key }).then(async (e) => {
    if (key !== 'auto') return e;
    autoPicks.set(env, e.backend);
    if (shared.get('auto') === p) shared.delete('auto');
    // A request naming the backend may have made it already: that one is the engine.
    const named = shared.get(e.backend);
    if (named === undefined) {
      shared.set(e.backend, p);
      return e;
    }
    await e.close();
    return sharedEngine(backend);
  });
  shared.set(key, p);
  p.catch(() => {
    if (shared.get(key) === p) shared.delete(key);
  });
  return p;
}
