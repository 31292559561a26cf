// The `nbd` protocol driver: a remote disk through the NBD client of @vmdisk/nbd, with
// QEMU's blockdev-add options (`server`, `export`, `tls-creds`, `tls-hostname`), so that a
// graph can overlay a remote disk (a qcow2 whose backing is this node) or mirror to one.
//
// What it relies on:
// - the generic layer's preconditions (driver.ts): requests in bounds and aligned to
//   `limits.requestAlignment`, which is the server's minimum block size, and pread/pwrite
//   at most `limits.maxTransfer` (the server's maximum), so the client never has to refuse
//   a request for its shape; an export whose size is not a multiple of its minimum block
//   size cannot have its unaligned tail read (the NBD spec forbids such exports);
// - write-like calls only on a writable node: open() refuses a read-only export for a node
//   that is not read-only (auto-read-only makes the node read-only instead);
// - close() is called drained: it sends NBD_CMD_DISC and waits for the server to hang up.
// An NBD export cannot grow: there is no truncate(), and a pwrite past the end (a parent
// holding 'resize', e.g. a format allocating at the end of its file) fails with EINVAL.
//
// Errors: a server's error keeps its errno (BlockIoError with errnoName 'EIO', 'ENOSPC'...,
// syscall 'nbd'); a lost connection fails every pending and later request with EIO (no
// reconnect: `reconnect-delay` is not supported); the graph's other nodes are unaffected.
// WRITE_ZEROES the server cannot do (or answers ENOTSUP to) rejects with NOT_SUPPORTED,
// so the generic layer writes zero buffers.
//
// TLS: `tls-creds` names a tls-creds-psk object (DIR/keys.psk, psktool's `identity:hexkey`
// lines, identity `username` or QEMU's default 'qemu') or a tls-creds-x509 object
// (DIR/ca-cert.pem, and client-cert.pem + client-key.pem when the server verifies clients),
// with endpoint 'client'; `tls-hostname` is the name the server's certificate must carry.
// `open-timeout` (seconds, default 30, 0: none) bounds the connect and the handshake; unlike
// QEMU's it does not retry.
// `x-dirty-bitmap` (QEMU's, experimental there too): a meta context such as
// `qemu:dirty-bitmap:NAME` selected instead of base:allocation, its flags read as if they
// were base:allocation's (a dirty extent, flag 1, shows as a hole: "data": false in a map),
// so that a map of the node lists a remote bitmap. A server not offering it fails the open
// with QEMU 7.2's words.
// Block status: a reply covers as much of the range asked as the server likes (no
// REQ_ONE), but one call answers one run; the rest of the reply answers the calls that
// continue where the last answer ended (a walk: one round trip per reply, not per extent,
// which over a loaded link was a whole convert's time). Any write through the node drops
// it, and a reply that raced with a write is not kept.

import { join } from 'node:path';
import type {
  NbdClient,
  NbdClientOptions,
  NbdClientTlsOptions,
  NbdCommandError,
  NbdConnectTarget,
} from '@vmdisk/nbd';
import { defineDriver, type ProtocolInstance, type ProtocolStatus } from '../driver.ts';
import { BlockError, BlockErrorCode, BlockIoError, BlockOptionError } from '../errors.ts';
import { custom, type Infer, int, opt, str, union } from '../schema.ts';

/** The default pread/pwrite size when the server gives no maximum (QEMU's too). */
const DEFAULT_MAX_TRANSFER = 32 << 20;
/** base:allocation's flags (NBD_STATE_HOLE, NBD_STATE_ZERO). */
const STATE_HOLE = 1;
const STATE_ZERO = 2;
/** The connect timeout in seconds when `open-timeout` is not given. */
const DEFAULT_OPEN_TIMEOUT = 30;

/** A string that is not empty. */
const nonEmpty = custom('str', (v, key, syntax) => {
  const x = str.parse(v, key, syntax);
  if (x === '') throw new BlockOptionError(key, 'expected a non-empty string');
  return x;
});

/** QEMU's port is a string: a number, or a service name we do not look up. */
const port = custom('str', (v, key, syntax) => {
  const p = nonEmpty.parse(v, key, syntax);
  const n = /^\d+$/.test(p) ? Number(p) : Number.NaN;
  if (!(n >= 1 && n <= 65535)) throw new BlockOptionError(key, `'${p}' is not a port`);
  return String(n);
});

/** QEMU's SocketAddress for `server`: inet and unix are the ones we connect to. */
const serverAddress = union(
  'type',
  {},
  {
    inet: { host: nonEmpty, port },
    unix: { path: nonEmpty },
  },
);
type NbdServerAddress = Infer<typeof serverAddress>;

/** A tls-creds-psk or tls-creds-x509 object (BlockGraph.addObject), as the driver uses it. */
export class NbdTlsCreds {
  readonly type: 'psk' | 'x509';
  /** The directory: keys.psk (psk) or ca-cert.pem, client-cert.pem, client-key.pem (x509). */
  readonly dir: string;
  readonly endpoint: 'client' | 'server';
  /** psk: the identity to use from keys.psk (QEMU's default: 'qemu'). */
  readonly username: string | undefined;
  /** x509: check the server's certificate (default true). */
  readonly verifyPeer: boolean;

  constructor(init: Omit<NbdTlsCreds, 'username'> & { username?: string | undefined }) {
    this.type = init.type;
    this.dir = init.dir;
    this.endpoint = init.endpoint;
    this.username = init.username;
    this.verifyPeer = init.verifyPeer;
  }
}

function tlsOptions(creds: NbdTlsCreds, hostname: string | undefined): NbdClientTlsOptions {
  if (creds.type === 'psk') {
    return {
      mode: 'require',
      pskFile: join(creds.dir, 'keys.psk'),
      username: creds.username ?? 'qemu',
    };
  }
  const tls: NbdClientTlsOptions = {
    mode: 'require',
    certificatesDir: creds.dir,
    verifyPeer: creds.verifyPeer,
  };
  if (hostname !== undefined) tls.hostname = hostname;
  return tls;
}

const NBD_ERRNO: Record<string, string> = {
  ERR_VMDISK_NBD_INVALID_REQUEST: 'EINVAL',
  ERR_VMDISK_NBD_READ_ONLY: 'EPERM',
  ERR_VMDISK_NBD_UNSUPPORTED: 'ENOTSUP',
  ERR_VMDISK_NBD_CLIENT_CLOSED: 'ESHUTDOWN',
  ERR_VMDISK_NBD_TIMEOUT: 'ETIMEDOUT',
};

/** An error of the client as one of ours: the server's errno kept, EIO for a lost connection. */
function ioError(err: unknown, node: string, offset?: number, length?: number): BlockError {
  if (err instanceof BlockError) return err;
  const e = err as { code?: unknown; errnoName?: unknown; errno?: unknown; message?: unknown };
  const errnoName =
    typeof e?.errnoName === 'string'
      ? e.errnoName
      : ((typeof e?.code === 'string' ? NBD_ERRNO[e.code] : undefined) ?? 'EIO');
  const init: ConstructorParameters<typeof BlockIoError>[1] = {
    errnoName,
    syscall: 'nbd',
    node,
    cause: err,
  };
  if (offset !== undefined) init.offset = offset;
  if (length !== undefined) init.length = length;
  return new BlockIoError(`${typeof e?.message === 'string' ? e.message : String(err)}`, init);
}

/**
 * The NBD client, loaded at the first nbd node's open: a graph of files only (an image
 * tool's) does not load it, nor node:net with it: ~10 ms of a `convert`'s start-up (median
 * of 12 imports after koffi's; 5 ms at best).
 */
let nbdModule: Promise<typeof import('@vmdisk/nbd')> | undefined;
const loadNbd = (): Promise<typeof import('@vmdisk/nbd')> => {
  nbdModule ??= import('@vmdisk/nbd');
  return nbdModule;
};

/** The class NbdCommandError (loaded: a client exists whenever one is thrown). */
let commandError: typeof NbdCommandError | undefined;

const isNotSupported = (err: unknown): boolean =>
  (commandError !== undefined &&
    err instanceof commandError &&
    (err.errnoName === 'ENOTSUP' || err.errnoName === 'EOPNOTSUPP')) ||
  (err as { code?: unknown })?.code === 'ERR_VMDISK_NBD_UNSUPPORTED';

class NbdInstance implements ProtocolInstance {
  readonly kind = 'protocol';
  readonly limits: { requestAlignment: number; maxTransfer: number };

  private readonly client: NbdClient;
  private readonly node: string;
  private readonly where: string;
  private readonly hasStatus: boolean;
  /** The meta context block status comes from (base:allocation or x-dirty-bitmap's). */
  private readonly context: string;
  /** The extents of the last reply past its answer, from `offset` on. */
  private rest: { offset: number; extents: { length: number; flags: number }[] } | undefined;
  /** Counts write-like calls: a block status reply sent before one is not kept. */
  private writes = 0;

  constructor(client: NbdClient, node: string, where: string, context: string) {
    this.client = client;
    this.node = node;
    this.where = where;
    this.context = context;
    const align = client.blockSize?.minimum ?? 1;
    const max = Math.min(client.blockSize?.maximum ?? DEFAULT_MAX_TRANSFER, DEFAULT_MAX_TRANSFER);
    this.limits = { requestAlignment: align, maxTransfer: Math.max(align, max - (max % align)) };
    this.hasStatus = client.metaContexts.includes(context);
  }

  size(): number {
    return this.client.size;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.client.read(offset, buf).then(
      () => undefined,
      (err: unknown) => {
        throw ioError(err, this.node, offset, buf.byteLength);
      },
    );
  }

  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    this.changed();
    return this.client.write(offset, buf).catch((err: unknown) => {
      throw ioError(err, this.node, offset, buf.byteLength);
    });
  }

  async flush(): Promise<void> {
    if (!this.client.canFlush) return;
    try {
      await this.client.flush();
    } catch (err) {
      throw ioError(err, this.node);
    }
  }

  /** The node's data may change: what the last block status reply said is not kept. */
  private changed(): void {
    this.writes++;
    this.rest = undefined;
  }

  async discard(offset: number, length: number): Promise<void> {
    this.changed();
    // Discard is advisory: a server without TRIM keeps the data.
    if (!this.client.canTrim) return;
    try {
      await this.client.trim(offset, length);
    } catch (err) {
      throw ioError(err, this.node, offset, length);
    }
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    this.changed();
    if (!this.client.canWriteZeroes) {
      throw new BlockError(
        BlockErrorCode.NOT_SUPPORTED,
        `the NBD server at ${this.where} does not support WRITE_ZEROES`,
      );
    }
    try {
      await this.client.writeZeroes(offset, length, { noHole: !mayUnmap });
    } catch (err) {
      if (isNotSupported(err)) {
        throw new BlockError(BlockErrorCode.NOT_SUPPORTED, (err as Error).message, { cause: err });
      }
      throw ioError(err, this.node, offset, length);
    }
  }

  async blockStatus(offset: number, length: number): Promise<ProtocolStatus> {
    if (!this.hasStatus) return { length, hole: false, zero: false };
    const rest = this.rest;
    this.rest = undefined;
    let extents: readonly { length: number; flags: number }[];
    const writes = this.writes;
    if (rest !== undefined && rest.offset === offset) {
      extents = rest.extents;
    } else {
      let result: Awaited<ReturnType<NbdClient['blockStatus']>>;
      try {
        result = await this.client.blockStatus(offset, length);
      } catch (err) {
        throw ioError(err, this.node, offset, length);
      }
      extents = result.get(this.context) ?? [];
    }
    const first = extents[0];
    if (!first) return { length, hole: false, zero: false };
    // Any context's flags read as base:allocation's (QEMU's x-dirty-bitmap does the same).
    const flags = first.flags & (STATE_HOLE | STATE_ZERO);
    // Merge the extents of one status that follow the first, up to the length asked.
    let n = 0;
    /** The first extent not wholly in the answer. */
    let next = 0;
    for (const e of extents) {
      if ((e.flags & (STATE_HOLE | STATE_ZERO)) !== flags) break;
      n += e.length;
      next++;
      if (n >= length) break;
    }
    const answer = Math.max(1, Math.min(n, length));
    // What the reply says past the answer (the part of an extent cut by `length` first),
    // kept for the call that continues from there, unless a write came in the meantime.
    if (writes === this.writes) {
      const left = extents.slice(next);
      if (n > answer) left.unshift({ length: n - answer, flags: extents[next - 1]!.flags });
      if (left.length > 0) this.rest = { offset: offset + answer, extents: left };
    }
    return {
      length: answer,
      hole: (flags & STATE_HOLE) !== 0,
      zero: (flags & STATE_ZERO) !== 0,
    };
  }

  async close(): Promise<void> {
    await this.client.close();
  }

  info(): Record<string, unknown> {
    return {
      server: this.where,
      export: this.client.exportName,
      tls: this.client.tls,
    };
  }
}

export const nbdDriver = defineDriver({
  name: 'nbd',
  options: {
    server: serverAddress,
    export: opt(str),
    'tls-creds': opt(str),
    'tls-hostname': opt(str),
    /** A meta context read in place of base:allocation (QEMU's, e.g. qemu:dirty-bitmap:NAME). */
    'x-dirty-bitmap': opt(str),
    /** Seconds for the connect and the handshake (QEMU's open-timeout; default 30, 0: none). */
    'open-timeout': opt(int({ min: 0, max: 86_400 })),
  },
  async open(ctx) {
    const o = ctx.options;
    // Request buffers from the engine's arena (see the rbd driver).
    await ctx.engine('auto');
    const server: NbdServerAddress = o.server;
    const exportName = o.export ?? '';
    const target: NbdConnectTarget =
      server.type === 'unix'
        ? { path: server.path }
        : { host: server.host, port: Number(server.port) };
    const where = server.type === 'unix' ? server.path : `${server.host}:${server.port}`;
    const options: NbdClientOptions = {
      exportName,
      connectTimeout: (o['open-timeout'] ?? DEFAULT_OPEN_TIMEOUT) * 1000,
      ...(ctx.configureSocket && { configureSocket: ctx.configureSocket }),
    };
    const context = o['x-dirty-bitmap'] ?? 'base:allocation';
    if (o['x-dirty-bitmap'] !== undefined) {
      options.baseAllocation = false;
      options.metaContexts = [context];
    }
    const credsId = o['tls-creds'];
    if (credsId !== undefined) {
      const found = (type: string): unknown => {
        try {
          return ctx.object(type, credsId, 'tls-creds');
        } catch {
          return undefined;
        }
      };
      const creds = found('tls-creds-psk') ?? found('tls-creds-x509');
      if (!(creds instanceof NbdTlsCreds)) {
        throw new BlockOptionError(
          'tls-creds',
          `no tls-creds-psk or tls-creds-x509 object with id '${credsId}'`,
        );
      }
      if (creds.endpoint !== 'client') {
        throw new BlockOptionError(
          'tls-creds',
          `object '${credsId}' has endpoint '${creds.endpoint}', expected 'client'`,
        );
      }
      options.tls = tlsOptions(creds, o['tls-hostname']);
    }
    const nbd = await loadNbd();
    commandError = nbd.NbdCommandError;
    let client: NbdClient;
    try {
      client = await nbd.NbdClient.connect(target, options);
    } catch (err) {
      if (err instanceof nbd.NbdOptionError && err.reply === 'ERR_UNKNOWN') {
        throw new BlockOptionError(
          'export',
          `the NBD server at ${where} has no export '${exportName}'`,
        );
      }
      const e = ioError(err, ctx.nodeName);
      e.message = `cannot open the NBD export '${exportName}' at ${where}: ${e.message}`;
      throw e;
    }
    if (client.readOnly && !ctx.readOnly) {
      if (ctx.autoReadOnly) {
        ctx.setReadOnly();
      } else {
        await client.close().catch(() => undefined);
        throw new BlockError(
          BlockErrorCode.READ_ONLY,
          `the NBD export '${exportName}' at ${where} is read-only: open the node with read-only: true`,
          { errnoName: 'EROFS' },
        );
      }
    }
    if (context !== 'base:allocation' && !client.metaContexts.includes(context)) {
      // QEMU 7.2 loses its "requested x-dirty-bitmap ... not found" on the way out.
      await client.close().catch(() => undefined);
      throw new BlockError(BlockErrorCode.BAD_OPTION, 'Could not open image: Invalid argument', {
        errnoName: 'EINVAL',
      });
    }
    return new NbdInstance(client, ctx.nodeName, where, context);
  },
});
