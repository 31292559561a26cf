// librados / librbd (Debian's librados2, librbd1) through koffi: a cluster connection, a
// pool's I/O context and an open image whose reads, writes, flushes, discards and
// write-zeroes are rbd_aio_* requests completing asynchronously.
//
// Completions: QEMU's block/rbd.c gives librbd a C callback, which librbd calls on its own
// finisher thread. A JS function cannot be that callback without koffi queueing every
// completion to the JS thread while the librbd thread waits for it, so instead the
// completions are created without a callback and the image is told to write to a pipe
// when one is done (rbd_set_image_notification, EVENT_TYPE_PIPE: librbd's own API for
// event-loop clients, which fio's rbd engine also uses). A socket reading the pipe
// (CompletionPipe) wakes the JS thread, which collects the done completions with
// rbd_poll_io_events. No thread-pool thread is held by a request, and no
// JS runs on a librbd thread.
//
// Control calls that block on the network (connect, open, create, resize, close,
// shutdown, diff iterate) run as koffi async calls on the libuv pool: they are rare and
// may take as long as the client's timeouts.
//
// The libraries are loaded on first use, so that importing the engine does not need them.
import koffi from 'koffi';
import { CompletionPipe } from './completion-pipe.ts';
import { EngineError, ErrorCode, IoError } from './errors.ts';
import { setMallocMmapThreshold } from './native.ts';

type Handle = bigint | number;
// biome-ignore lint/suspicious/noExplicitAny: koffi's loaded functions are untyped.
type Fn = any;

interface Lib {
  radosCreate2: Fn;
  radosConfReadFile: Fn;
  radosConfSet: Fn;
  radosConnect: Fn;
  radosShutdown: Fn;
  ioctxCreate: Fn;
  ioctxDestroy: Fn;
  ioctxSetNamespace: Fn;
  rbdOpen: Fn;
  rbdOpenReadOnly: Fn;
  rbdClose: Fn;
  rbdCreate: Fn;
  rbdGetSize: Fn;
  rbdGetFeatures: Fn;
  rbdGetFlags: Fn;
  rbdStat: Fn;
  rbdResize: Fn;
  rbdSetImageNotification: Fn;
  rbdPollIoEvents: Fn;
  aioCreate: Fn;
  aioGetReturn: Fn;
  aioRelease: Fn;
  aioRead: Fn;
  aioWrite: Fn;
  aioFlush: Fn;
  aioDiscard: Fn;
  aioWriteZeroes: Fn;
  diffIterate2: Fn;
  diffCallback: Fn;
}

let lib: Lib | undefined;

function load(): Lib {
  if (lib) return lib;
  let rados: ReturnType<typeof koffi.load>;
  let rbd: ReturnType<typeof koffi.load>;
  try {
    rados = koffi.load('librados.so.2');
    rbd = koffi.load('librbd.so.1');
  } catch (err) {
    throw new EngineError(
      ErrorCode.BACKEND_UNAVAILABLE,
      `librbd is not installed (Debian: librbd1): ${(err as Error).message}`,
      { cause: err },
    );
  }
  // librbd allocates a buffer per request (the size of the request, up to an object): with
  // glibc's mmap threshold fixed at 128 KiB (vm-disk serve fixes it, see
  // setMallocMmapThreshold) every large one is an mmap, page faults and an munmap, on
  // librbd's threads: 1 MiB reads ran 7 times slower here. Blocks above 8 MiB (the NBD
  // server's largest buffers) are still mapped, and so given back when freed.
  setMallocMmapThreshold(RBD_MMAP_THRESHOLD);
  const diffCallback = koffi.proto(
    'int rbd_diff_cb(uint64_t off, size_t len, int exists, void *arg)',
  );
  lib = {
    radosCreate2: rados.func(
      'int rados_create2(_Out_ uint64_t *cluster, const char *cluster_name, const char *name, uint64_t flags)',
    ),
    radosConfReadFile: rados.func('int rados_conf_read_file(void *cluster, const char *path)'),
    radosConfSet: rados.func(
      'int rados_conf_set(void *cluster, const char *option, const char *value)',
    ),
    radosConnect: rados.func('int rados_connect(void *cluster)'),
    radosShutdown: rados.func('void rados_shutdown(void *cluster)'),
    ioctxCreate: rados.func(
      'int rados_ioctx_create(void *cluster, const char *pool, _Out_ uint64_t *ioctx)',
    ),
    ioctxDestroy: rados.func('void rados_ioctx_destroy(void *ioctx)'),
    ioctxSetNamespace: rados.func('void rados_ioctx_set_namespace(void *ioctx, const char *ns)'),
    rbdOpen: rbd.func(
      'int rbd_open(void *ioctx, const char *name, _Out_ uint64_t *image, const char *snap)',
    ),
    rbdOpenReadOnly: rbd.func(
      'int rbd_open_read_only(void *ioctx, const char *name, _Out_ uint64_t *image, const char *snap)',
    ),
    rbdClose: rbd.func('int rbd_close(void *image)'),
    rbdCreate: rbd.func(
      'int rbd_create(void *ioctx, const char *name, uint64_t size, _Inout_ int *order)',
    ),
    rbdGetSize: rbd.func('int rbd_get_size(void *image, _Out_ uint64_t *size)'),
    rbdGetFeatures: rbd.func('int rbd_get_features(void *image, _Out_ uint64_t *features)'),
    rbdGetFlags: rbd.func('int rbd_get_flags(void *image, _Out_ uint64_t *flags)'),
    // rbd_image_info_t: size, obj_size, num_objs (uint64), order (int), then names we skip.
    rbdStat: rbd.func('int rbd_stat(void *image, void *info, size_t infosize)'),
    rbdResize: rbd.func('int rbd_resize(void *image, uint64_t size)'),
    rbdSetImageNotification: rbd.func(
      'int rbd_set_image_notification(void *image, int fd, int type)',
    ),
    rbdPollIoEvents: rbd.func('int rbd_poll_io_events(void *image, void *comps, int numcomp)'),
    // The completion comes back in a BigUint64Array (a typed array is passed as a pointer
    // to its memory: no array to convert, as an _Out_ parameter would need, per request).
    aioCreate: rbd.func(
      'int rbd_aio_create_completion(uintptr_t cb_arg, void *complete_cb, void *c)',
    ),
    aioGetReturn: rbd.func('int64_t rbd_aio_get_return_value(void *c)'),
    aioRelease: rbd.func('void rbd_aio_release(void *c)'),
    aioRead: rbd.func(
      'int rbd_aio_read(void *image, uint64_t off, size_t len, void *buf, void *c)',
    ),
    aioWrite: rbd.func(
      'int rbd_aio_write(void *image, uint64_t off, size_t len, void *buf, void *c)',
    ),
    aioFlush: rbd.func('int rbd_aio_flush(void *image, void *c)'),
    aioDiscard: rbd.func('int rbd_aio_discard(void *image, uint64_t off, uint64_t len, void *c)'),
    aioWriteZeroes: rbd.func(
      'int rbd_aio_write_zeroes(void *image, uint64_t off, size_t len, void *c, int zero_flags, int op_flags)',
    ),
    diffIterate2: rbd.func(
      'int rbd_diff_iterate2(void *image, const char *fromsnap, uint64_t ofs, uint64_t len, uint8_t include_parent, uint8_t whole_object, rbd_diff_cb *cb, void *arg)',
    ),
    diffCallback,
  };
  return lib;
}

/** Calls a koffi function on the libuv pool (a blocking control call). */
function callAsync(fn: Fn, ...args: unknown[]): Promise<number> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: unknown, result: number | bigint) => {
      if (err) reject(err);
      else resolve(Number(result));
    });
  });
}

/** glibc's mmap threshold while librbd is loaded (see load()). */
const RBD_MMAP_THRESHOLD = 8 << 20;
/** librbd's EVENT_TYPE_PIPE. */
const EVENT_TYPE_PIPE = 1;
/** RBD_FEATURE_FAST_DIFF and RBD_FLAG_FAST_DIFF_INVALID. */
const RBD_FEATURE_FAST_DIFF = 1n << 4n;
const RBD_FLAG_FAST_DIFF_INVALID = 1n << 1n;
/** RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zeros written, not a hole. */
const WRITE_ZEROES_THICK = 1;
/** What the diff callback returns to stop the iteration at the first extent (QEMU's value). */
const STOP_DIFF_ITERATE = -9000;
/** Completions collected per rbd_poll_io_events call. */
const POLL_BATCH = 64;

/** A failed librados/librbd call: errno and the function's name. */
function check(
  r: number,
  call: string,
  details: { path?: string; offset?: number; length?: number } = {},
): void {
  if (r < 0) throw new IoError(-r, call, details);
}

export interface RadosOptions {
  /** A ceph.conf to read; absent: librados's default search (errors ignored, as QEMU does). */
  conf?: string | undefined;
  /** The client id without 'client.' (default admin). */
  user?: string | undefined;
  /** Configuration options set after the file: key, mon_host, auth_client_required, timeouts. */
  settings?: Record<string, string> | undefined;
}

/** A connected cluster handle (rados_t). */
export class RadosCluster {
  readonly handle: Handle;
  private constructor(handle: Handle) {
    this.handle = handle;
  }

  /**
   * Creates, configures and connects a cluster handle. A conf file that cannot be read, a
   * bad setting or a failed connection rejects with an IoError naming the call.
   */
  static async connect(options: RadosOptions): Promise<RadosCluster> {
    const l = load();
    const out = [0n];
    check(l.radosCreate2(out, 'ceph', `client.${options.user ?? 'admin'}`, 0), 'rados_create2');
    const cluster = new RadosCluster(out[0]!);
    try {
      if (options.conf !== undefined) {
        check(l.radosConfReadFile(cluster.handle, options.conf), 'rados_conf_read_file', {
          path: options.conf,
        });
      } else {
        l.radosConfReadFile(cluster.handle, null);
      }
      for (const [key, value] of Object.entries(options.settings ?? {})) {
        check(l.radosConfSet(cluster.handle, key, value), `rados_conf_set(${key})`);
      }
      check(await callAsync(l.radosConnect, cluster.handle), 'rados_connect');
    } catch (err) {
      await cluster.shutdown();
      throw err;
    }
    return cluster;
  }

  /** An I/O context on a pool (and namespace). */
  ioctx(pool: string, namespace?: string): RadosIoctx {
    const l = load();
    const out = [0n];
    check(l.ioctxCreate(this.handle, pool, out), 'rados_ioctx_create', { path: pool });
    if (namespace !== undefined) l.ioctxSetNamespace(out[0], namespace);
    return new RadosIoctx(out[0]!);
  }

  async shutdown(): Promise<void> {
    await callAsync(load().radosShutdown, this.handle);
  }
}

/** A pool's I/O context (rados_ioctx_t). */
export class RadosIoctx {
  readonly handle: Handle;
  constructor(handle: Handle) {
    this.handle = handle;
  }

  /** rbd_create: a new image of `size` bytes with objects of 2^order bytes (0: the default). */
  async createImage(name: string, size: number, order = 0): Promise<void> {
    const l = load();
    const o = [order];
    check(
      await new Promise<number>((resolve, reject) => {
        l.rbdCreate.async(this.handle, name, BigInt(size), o, (err: unknown, r: number) =>
          err ? reject(err) : resolve(r),
        );
      }),
      'rbd_create',
      { path: name },
    );
  }

  destroy(): void {
    load().ioctxDestroy(this.handle);
  }
}

interface Pending {
  resolve(n: number): void;
  reject(err: unknown): void;
  call: string;
  offset: number;
  length: number;
  /** Keeps the buffer alive while librbd uses its memory. */
  buf: Uint8Array | undefined;
}

/** Allocation of a range as rbd_diff_iterate2 reports it. */
export interface RbdExtent {
  /** Bytes from the offset asked that this answer covers. */
  length: number;
  allocated: boolean;
}

/** An open image (rbd_image_t) with asynchronous I/O. */
export class RbdImage {
  private readonly completions: CompletionPipe;
  /** The requests in flight, by their completion (rbd_completion_t's address). */
  private readonly pending = new Map<bigint, Pending>();
  private readonly comps = new BigUint64Array(POLL_BATCH);
  /** rbd_aio_create_completion's out parameter. */
  private readonly created = new BigUint64Array(1);
  private closed = false;

  readonly handle: Handle;
  readonly name: string;

  private constructor(handle: Handle, name: string) {
    this.handle = handle;
    this.name = name;
    const l = load();
    this.completions = new CompletionPipe(() => this.reap());
    const r = l.rbdSetImageNotification(handle, this.completions.writeFd, EVENT_TYPE_PIPE);
    if (r < 0) {
      this.completions.close();
      throw new IoError(-r, 'rbd_set_image_notification', { path: name });
    }
  }

  /** rbd_open (rbd_open_read_only when readOnly; a snapshot is always read-only). */
  static async open(
    ioctx: RadosIoctx,
    name: string,
    options: { readOnly?: boolean; snapshot?: string | undefined } = {},
  ): Promise<RbdImage> {
    const l = load();
    const out = [0n];
    const fn = options.readOnly ? l.rbdOpenReadOnly : l.rbdOpen;
    const r = await new Promise<number>((resolve, reject) => {
      fn.async(ioctx.handle, name, out, options.snapshot ?? null, (err: unknown, n: number) =>
        err ? reject(err) : resolve(n),
      );
    });
    check(r, options.readOnly ? 'rbd_open_read_only' : 'rbd_open', { path: name });
    try {
      return new RbdImage(out[0]!, name);
    } catch (err) {
      await callAsync(l.rbdClose, out[0]);
      throw err;
    }
  }

  size(): number {
    const out = [0n];
    check(load().rbdGetSize(this.handle, out), 'rbd_get_size', { path: this.name });
    return Number(out[0]);
  }

  /** The object size (2^order), from rbd_stat. */
  objectSize(): number {
    const info = new BigUint64Array(8);
    check(load().rbdStat(this.handle, info, info.byteLength), 'rbd_stat', { path: this.name });
    return Number(info[1]);
  }

  /** Whether allocation can be asked cheaply: fast-diff enabled and its map valid. */
  hasFastDiff(): boolean {
    const l = load();
    const features = [0n];
    const flags = [0n];
    if (l.rbdGetFeatures(this.handle, features) < 0) return false;
    if (l.rbdGetFlags(this.handle, flags) < 0) return false;
    return (
      (BigInt(features[0]!) & RBD_FEATURE_FAST_DIFF) !== 0n &&
      (BigInt(flags[0]!) & RBD_FLAG_FAST_DIFF_INVALID) === 0n
    );
  }

  read(offset: number, buf: Uint8Array): Promise<number> {
    return this.submit('rbd_aio_read', offset, buf.byteLength, buf, (c) =>
      load().aioRead(this.handle, offset, buf.byteLength, buf, c),
    );
  }

  write(offset: number, buf: Uint8Array): Promise<number> {
    return this.submit('rbd_aio_write', offset, buf.byteLength, buf, (c) =>
      load().aioWrite(this.handle, offset, buf.byteLength, buf, c),
    );
  }

  flush(): Promise<number> {
    return this.submit('rbd_aio_flush', 0, 0, undefined, (c) => load().aioFlush(this.handle, c));
  }

  discard(offset: number, length: number): Promise<number> {
    return this.submit('rbd_aio_discard', offset, length, undefined, (c) =>
      load().aioDiscard(this.handle, offset, length, c),
    );
  }

  /** Zeros the range; mayUnmap false asks for the zeros to be stored (thick). */
  writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<number> {
    return this.submit('rbd_aio_write_zeroes', offset, length, undefined, (c) =>
      load().aioWriteZeroes(this.handle, offset, length, c, mayUnmap ? 0 : WRITE_ZEROES_THICK, 0),
    );
  }

  /**
   * Allocation from offset on (one run), as QEMU's qemu_rbd_co_block_status asks it:
   * rbd_diff_iterate2 from the beginning of the image, parents included, whole objects,
   * stopped at the first extent reported.
   */
  async allocation(offset: number, length: number): Promise<RbdExtent> {
    const l = load();
    let first: { off: number; len: number } | undefined;
    const cb = koffi.register((off: bigint | number, len: bigint | number, exists: number) => {
      if (exists) {
        first = { off: Number(off), len: Number(len) };
        return STOP_DIFF_ITERATE;
      }
      return 0;
    }, koffi.pointer(l.diffCallback));
    try {
      const r = await callAsync(l.diffIterate2, this.handle, null, offset, length, 1, 1, cb, null);
      if (r < 0 && r !== STOP_DIFF_ITERATE)
        check(r, 'rbd_diff_iterate2', { path: this.name, offset, length });
    } finally {
      koffi.unregister(cb);
    }
    if (!first || first.off >= offset + length) return { length, allocated: false };
    if (first.off > offset) return { length: first.off - offset, allocated: false };
    return { length: Math.min(first.off + first.len - offset, length), allocated: true };
  }

  async resize(size: number): Promise<void> {
    check(await callAsync(load().rbdResize, this.handle, size), 'rbd_resize', {
      path: this.name,
    });
  }

  /** Closes the image (after its requests completed: the caller drains first). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const r = await callAsync(load().rbdClose, this.handle);
    this.completions.close();
    check(r, 'rbd_close', { path: this.name });
  }

  private submit(
    call: string,
    offset: number,
    length: number,
    buf: Uint8Array | undefined,
    start: (comp: Handle) => number,
  ): Promise<number> {
    if (this.closed) {
      return Promise.reject(
        new EngineError(ErrorCode.FILE_CLOSED, `image '${this.name}' is closed`),
      );
    }
    const l = load();
    const r0 = l.aioCreate(0, null, this.created);
    if (r0 < 0) return Promise.reject(new IoError(-r0, 'rbd_aio_create_completion'));
    const comp = this.created[0]!;
    const r = start(comp);
    if (r < 0) {
      l.aioRelease(comp);
      return Promise.reject(new IoError(-r, call, { path: this.name, offset, length }));
    }
    return new Promise<number>((resolve, reject) => {
      this.pending.set(comp, { resolve, reject, call, offset, length, buf });
      this.completions.setBusy(true);
    });
  }

  /** librbd wrote to the pipe: collect and settle every completion that is done. */
  private reap(): void {
    const l = load();
    for (;;) {
      const n = l.rbdPollIoEvents(this.handle, this.comps, POLL_BATCH);
      if (n <= 0) break;
      for (let i = 0; i < n; i++) {
        const comp = this.comps[i]!;
        const r = Number(l.aioGetReturn(comp));
        // Forgotten before released: a completion made later may have the same address.
        const p = this.pending.get(comp);
        this.pending.delete(comp);
        l.aioRelease(comp);
        if (!p) continue;
        if (r < 0) {
          p.reject(
            new IoError(-r, p.call, { path: this.name, offset: p.offset, length: p.length }),
          );
        } else {
          p.resolve(r);
        }
      }
      if (n < POLL_BATCH) break;
    }
    this.completions.setBusy(this.pending.size > 0);
  }
}
