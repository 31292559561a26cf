// The `rbd` protocol driver: an image of a Ceph cluster through librbd (the engine's
// bindings, @vmdisk/engine's RbdImage), with QEMU 7.2's blockdev-add options: `pool`,
// `namespace`, `image`, `snapshot`, `conf`, `user`, `key-secret` (a secret object holding
// the cephx key), `auth-client-required` and `server` (the monitors), plus QEMU's hidden
// `=keyvalue-pairs` (a JSON list key, value, ... of librados settings, which `rbd:`
// filenames produce).
//
// What it relies on: the generic layer's preconditions (driver.ts); requests need no
// alignment (librbd takes any). A write or write-zeroes past the end grows the image first
// (QEMU does the same: a qcow2 on rbd allocates at its end). Block status comes from
// rbd_diff_iterate2 over whole objects when the image has a valid fast-diff map (QEMU's
// rule); otherwise everything is data.
//
// Errors: opening fails with an RbdError (errors.ts) of QEMU's wording and the errno
// librados or librbd gave; I/O fails with a BlockIoError keeping the errno (ETIMEDOUT when
// `rados_osd_op_timeout` expires with the OSD gone) and naming the librbd call.

import { RadosCluster, type RadosIoctx, RbdImage } from '@vmdisk/engine';
import { defineDriver, type ProtocolInstance, type ProtocolStatus } from '../driver.ts';
import {
  BlockError,
  BlockErrorCode,
  BlockIoError,
  BlockOptionError,
  errnoName,
  RbdError,
  RbdErrorCode,
  type RbdErrorCodeValue,
} from '../errors.ts';
import { custom, enumOf, type Infer, list, opt, str, struct } from '../schema.ts';

/** What strerror() says for the errnos librados and librbd return (QEMU's messages use it). */
const STRERROR: Record<string, string> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EIO: 'Input/output error',
  EACCES: 'Permission denied',
  EEXIST: 'File exists',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  ETIMEDOUT: 'Connection timed out',
  EBUSY: 'Device or resource busy',
  ENOTCONN: 'Transport endpoint is not connected',
  ECONNREFUSED: 'Connection refused',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  EBLOCKLISTED: 'Cannot send after transport endpoint shutdown',
};

/** The errno of an error from the engine's librados/librbd calls, as a name. */
function errnoOf(err: unknown): string {
  const e = err as { errnoName?: unknown; errno?: unknown };
  if (typeof e?.errnoName === 'string') return e.errnoName;
  if (typeof e?.errno === 'number') return errnoName(e.errno) ?? 'EIO';
  return 'EIO';
}

export function strerror(name: string): string {
  return STRERROR[name] ?? name;
}

/** QEMU's error_setg_errno: "WHAT: strerror(errno)", with our code and the errno kept. */
function rbdError(code: RbdErrorCodeValue, what: string, err: unknown): RbdError {
  const name = errnoOf(err);
  return new RbdError(code, `${what}: ${strerror(name)}`, { errnoName: name, cause: err });
}

/** QEMU's InetSocketAddressBase: the monitors of `server`. */
const monitor = { host: str, port: str } as const;

/** The connection and image keys, shared with blockdev-create's `location`. */
export const rbdOptions = {
  pool: str,
  namespace: opt(str),
  image: str,
  conf: opt(str),
  snapshot: opt(str),
  encrypt: opt(
    custom('any', (_v, key) => {
      throw new BlockOptionError(key, 'RBD encryption is not supported');
    }),
  ),
  user: opt(str),
  'auth-client-required': opt(list(enumOf(['cephx', 'none']))),
  'key-secret': opt(str),
  server: opt(list(struct(monitor, 'InetSocketAddressBase'))),
  /** QEMU's hidden option: librados settings as a JSON list [key, value, ...]. */
  '=keyvalue-pairs': opt(str),
} as const;

export type RbdLocation = Infer<typeof rbdOptions>;

/** blockdev-create's `location` (QEMU's BlockdevOptionsRbd: no hidden options). */
const { '=keyvalue-pairs': _hidden, ...locationOptions } = rbdOptions;
export const rbdLocationOptions = locationOptions;

/** What a driver needs from the graph to connect: the secret objects by id. */
export type SecretLookup = (id: string, key: string) => Buffer;

/** QEMU's qemu_rbd_mon_host: host:port;host:port ([v6]:port for IPv6). */
function monHost(servers: readonly { host: string; port: string }[]): string {
  return servers
    .map((s) => (s.host.includes(':') ? `[${s.host}]:${s.port}` : `${s.host}:${s.port}`))
    .join(';');
}

function keyvaluePairs(json: string | undefined): [string, string][] {
  if (json === undefined) return [];
  let list: unknown;
  try {
    list = JSON.parse(json);
  } catch {
    throw new BlockOptionError('=keyvalue-pairs', 'not a JSON list');
  }
  if (!Array.isArray(list) || list.length % 2 !== 0 || list.some((x) => typeof x !== 'string')) {
    throw new BlockOptionError('=keyvalue-pairs', 'expected a JSON list of key, value strings');
  }
  const out: [string, string][] = [];
  for (let i = 0; i < list.length; i += 2) out.push([list[i] as string, list[i + 1] as string]);
  return out;
}

/** A connected cluster and an I/O context on the location's pool (QEMU's qemu_rbd_connect). */
export async function rbdConnect(
  o: RbdLocation,
  secret: SecretLookup,
  cache = true,
): Promise<{ cluster: RadosCluster; ioctx: RadosIoctx }> {
  const settings: Record<string, string> = {};
  for (const [k, v] of keyvaluePairs(o['=keyvalue-pairs'])) settings[k] = v;
  if (o.server !== undefined && o.server.length > 0) settings.mon_host = monHost(o.server);
  if (o['key-secret'] !== undefined) {
    settings.key = secret(o['key-secret'], 'key-secret').toString('base64');
  }
  if (o['auth-client-required'] !== undefined) {
    settings.auth_client_required = o['auth-client-required'].join(';');
  }
  // As QEMU: librbd's cache unless cache.direct (flush() writes it back).
  settings.rbd_cache = cache ? 'true' : 'false';
  let cluster: RadosCluster;
  try {
    cluster = await RadosCluster.connect({ conf: o.conf, user: o.user, settings });
  } catch (err) {
    const call = (err as { syscall?: unknown })?.syscall;
    if (call === 'rados_conf_read_file') {
      throw rbdError(RbdErrorCode.CONF, `error reading conf file ${o.conf}`, err);
    }
    if (typeof call === 'string' && call.startsWith('rados_conf_set')) {
      const key = call.slice('rados_conf_set('.length, -1);
      throw rbdError(RbdErrorCode.SETTING, `Could not set '${key}'`, err);
    }
    if (call === 'rados_create2') throw rbdError(RbdErrorCode.CONNECT, 'error initializing', err);
    throw rbdError(RbdErrorCode.CONNECT, 'error connecting', err);
  }
  try {
    const ioctx = cluster.ioctx(o.pool, o.namespace);
    return { cluster, ioctx };
  } catch (err) {
    await cluster.shutdown();
    throw rbdError(RbdErrorCode.POOL, `error opening pool ${o.pool}`, err);
  }
}

class RbdInstance implements ProtocolInstance {
  readonly kind = 'protocol';
  private readonly fastDiff: boolean;
  /**
   * The image's size, read at open and kept up to date by our resizes (QEMU's image_size):
   * asked on every request, and rbd_get_size takes librbd's image lock each time.
   */
  private imageSize: number;
  /** A resize in progress (writes past the end wait for it). */
  private growing: Promise<void> | undefined;

  private readonly image: RbdImage;
  private readonly cluster: RadosCluster;
  private readonly ioctx: RadosIoctx;
  private readonly node: string;
  private readonly location: RbdLocation;

  constructor(
    image: RbdImage,
    cluster: RadosCluster,
    ioctx: RadosIoctx,
    node: string,
    location: RbdLocation,
  ) {
    this.image = image;
    this.cluster = cluster;
    this.ioctx = ioctx;
    this.node = node;
    this.location = location;
    this.fastDiff = image.hasFastDiff();
    this.imageSize = image.size();
  }

  size(): number {
    return this.imageSize;
  }

  private ioError(err: unknown, call: string, offset?: number, length?: number): BlockError {
    if (err instanceof BlockError) return err;
    const name = errnoOf(err);
    const init: ConstructorParameters<typeof BlockIoError>[1] = {
      errnoName: name,
      syscall: (err as { syscall?: string })?.syscall ?? call,
      node: this.node,
      cause: err,
    };
    if (offset !== undefined) init.offset = offset;
    if (length !== undefined) init.length = length;
    const where = `${this.location.pool}/${this.location.image}`;
    return new BlockIoError(`${init.syscall} on ${where} failed: ${strerror(name)}`, init);
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.image.read(offset, buf).then(
      (n) => {
        if (n < buf.byteLength) buf.fill(0, n);
      },
      (err: unknown) => {
        throw this.ioError(err, 'rbd_aio_read', offset, buf.byteLength);
      },
    );
  }

  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.byteLength;
    // Within the image (every write but the growing ones): straight to librbd, no await.
    const op =
      end <= this.imageSize
        ? this.image.write(offset, buf)
        : this.growTo(end).then(() => this.image.write(offset, buf));
    return op.then(
      () => undefined,
      (err: unknown) => {
        throw this.ioError(err, 'rbd_aio_write', offset, buf.byteLength);
      },
    );
  }

  async flush(): Promise<void> {
    try {
      await this.image.flush();
    } catch (err) {
      throw this.ioError(err, 'rbd_aio_flush');
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    try {
      await this.image.discard(offset, length);
    } catch (err) {
      throw this.ioError(err, 'rbd_aio_discard', offset, length);
    }
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    await this.growTo(offset + length);
    try {
      await this.image.writeZeroes(offset, length, mayUnmap);
    } catch (err) {
      throw this.ioError(err, 'rbd_aio_write_zeroes', offset, length);
    }
  }

  async blockStatus(offset: number, length: number): Promise<ProtocolStatus> {
    if (!this.fastDiff) return { length, hole: false, zero: false };
    try {
      const e = await this.image.allocation(offset, length);
      return { length: e.length, hole: !e.allocated, zero: !e.allocated };
    } catch (err) {
      throw this.ioError(err, 'rbd_diff_iterate2', offset, length);
    }
  }

  async truncate(size: number): Promise<void> {
    try {
      await this.image.resize(size);
      this.imageSize = size;
    } catch (err) {
      throw this.ioError(err, 'rbd_resize');
    }
  }

  /** Grows the image to `end` when a write reaches past it (one resize at a time). */
  private async growTo(end: number): Promise<void> {
    while (end > this.imageSize) {
      if (!this.growing) {
        this.growing = this.truncate(end).finally(() => {
          this.growing = undefined;
        });
      }
      await this.growing;
    }
  }

  async close(): Promise<void> {
    try {
      await this.image.close();
    } finally {
      this.ioctx.destroy();
      await this.cluster.shutdown();
    }
  }

  info(): Record<string, unknown> {
    return {
      // QEMU's bdrv_get_info: the object size (qemu-img info's cluster_size).
      'cluster-size': this.image.objectSize(),
      pool: this.location.pool,
      image: this.location.image,
      ...(this.location.namespace !== undefined && { namespace: this.location.namespace }),
      ...(this.location.snapshot !== undefined && { snapshot: this.location.snapshot }),
    };
  }
}

/** The secret objects of a graph, for `key-secret`. */
function secretLookup(object: (type: string, id: string, key: string) => unknown): SecretLookup {
  return (id, key) => {
    const s = object('secret', id, key) as { data?: unknown };
    if (!(s?.data instanceof Buffer)) throw new BlockOptionError(key, `'${id}' is not a secret`);
    return s.data;
  };
}

export const rbdDriver = defineDriver({
  name: 'rbd',
  options: rbdOptions,
  async open(ctx) {
    const o = ctx.options;
    if (o.snapshot !== undefined && !ctx.readOnly) {
      if (!ctx.autoReadOnly) {
        throw new BlockError(BlockErrorCode.READ_ONLY, 'rbd snapshots are read-only', {
          errnoName: 'EINVAL',
        });
      }
      ctx.setReadOnly();
    }
    // The graph's request buffers come from the engine's arena once an engine is open
    // (otherwise each is a new Buffer: 1 MiB writes spent most of their CPU faulting pages).
    await ctx.engine('auto');
    const { cluster, ioctx } = await rbdConnect(
      o,
      // Read once here, as QEMU does: the secret object may be deleted once the node is open.
      secretLookup((t, i, k) => ctx.object(t, i, k, false)),
      !ctx.direct,
    );
    let image: RbdImage;
    try {
      image = await RbdImage.open(ioctx, o.image, {
        readOnly: ctx.readOnly || o.snapshot !== undefined,
        snapshot: o.snapshot,
      });
    } catch (err) {
      ioctx.destroy();
      await cluster.shutdown();
      throw rbdError(RbdErrorCode.IMAGE, `error reading header from ${o.image}`, err);
    }
    return new RbdInstance(image, cluster, ioctx, ctx.nodeName, o);
  },
});

/**
 * Creates an image (QEMU's qemu_rbd_do_create): `size` bytes, objects of `clusterSize`
 * bytes (a power of two, at least 4 KiB; absent: librbd's default, 4 MiB), the cluster's
 * default features.
 */
export async function createRbd(
  location: RbdLocation,
  size: number,
  clusterSize: number | undefined,
  secret: SecretLookup,
): Promise<void> {
  let order = 0;
  if (clusterSize !== undefined) {
    if ((clusterSize - 1) & clusterSize || clusterSize === 0) {
      throw new BlockOptionError(
        'cluster-size',
        'not a power of 2',
        'obj size needs to be power of 2',
      );
    }
    if (clusterSize < 4096) {
      throw new BlockOptionError('cluster-size', 'below 4096', 'obj size too small');
    }
    order = Math.log2(clusterSize);
  }
  if (location.snapshot !== undefined) {
    throw new BlockOptionError(
      'snapshot',
      'not for creation',
      "Can't use snapshot name for rbd image creation",
    );
  }
  const { cluster, ioctx } = await rbdConnect(location, secret);
  try {
    await ioctx.createImage(location.image, size, order);
  } catch (err) {
    throw rbdError(RbdErrorCode.CREATE, 'error rbd create', err);
  } finally {
    ioctx.destroy();
    await cluster.shutdown();
  }
}
