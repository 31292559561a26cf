// A vhost-user-blk export: a unix socket a QEMU vhost-user-blk device connects to, and
// the virtio-blk device behind it, serving an ExportTarget. As qemu-storage-daemon's, one
// front-end at a time: while one is connected, others wait in the listen backlog.
import { unlinkSync } from 'node:fs';
import type { ExportTarget } from '@vmdisk/nbd';
import type { node } from 'koffi';
import { VhostUserConnection } from './connection.ts';
import { VhostUserError } from './errors.ts';
import { accept, closeFd, EAGAIN, ERRNOS, listenUnix, pollHandle } from './native.ts';
import { blkFeatures } from './protocol.ts';

export interface VhostUserBlkOptions {
  /** The unix socket path (a stale socket there is replaced, as QEMU does). */
  path: string;
  target: ExportTarget;
  writable: boolean;
  /** 512 (the default) to 2 MiB, a power of two, as QEMU's logical-block-size. */
  logicalBlockSize?: number;
  /** 1 (the default) to 65535, as QEMU's num-queues. */
  numQueues?: number;
  /**
   * The export's writethrough option (default off): as qemu-storage-daemon 7.2, the
   * backend's write cache is on unless it is set, whatever the guest was told (its config
   * says write-through until it turns its write cache on or off itself, CONFIG_WCE).
   */
  writethrough?: boolean;
  /** What GET_ID answers: qemu-storage-daemon's "vhost_user_blk" by default. */
  serial?: string;
  /** A front-end or guest misbehaved, or a request failed (the server keeps serving). */
  onError?: (err: VhostUserError) => void;
  /** A front-end connected (true) or went away (false). */
  onConnection?: (connected: boolean) => void;
}

const MAX_QUEUES = 0xffff;
const MAX_BLOCK_SIZE = 2 * 1024 * 1024;

export class VhostUserBlkServer {
  private listenFd = -1;
  private listener: node.PollHandle | undefined;
  private connection: VhostUserConnection | undefined;
  private closing: Promise<void> | undefined;
  private readonly blkSize: number;
  private readonly numQueues: number;
  /** The write cache: the export's, kept across front-ends. */
  private readonly cache: { writeback: boolean; wce: boolean };

  private readonly options: VhostUserBlkOptions;

  constructor(options: VhostUserBlkOptions) {
    this.options = options;
    const bs = options.logicalBlockSize ?? 512;
    if (bs < 512 || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
      throw new VhostUserError(
        'ERR_VMDISK_VHOST_INVALID_ARGUMENT',
        `logical-block-size must be a power of 2 between 512 and ${MAX_BLOCK_SIZE}, got ${bs}`,
      );
    }
    const nq = options.numQueues ?? 1;
    if (!Number.isInteger(nq) || nq < 1 || nq > MAX_QUEUES) {
      throw new VhostUserError(
        'ERR_VMDISK_VHOST_INVALID_ARGUMENT',
        `num-queues must be between 1 and ${MAX_QUEUES}`,
      );
    }
    this.blkSize = bs;
    this.numQueues = nq;
    this.cache = { writeback: !options.writethrough, wce: false };
  }

  /** A front-end is connected. */
  get connected(): boolean {
    return this.connection !== undefined;
  }

  /** Binds the socket (replacing a stale one) and starts accepting. */
  listen(): void {
    const path = this.options.path;
    try {
      unlinkSync(path);
    } catch {
      // none there
    }
    const fd = listenUnix(path);
    if (fd < 0) {
      const [errnoName, text] = ERRNOS[-fd] ?? [`errno ${-fd}`, `errno ${-fd}`];
      throw new VhostUserError(
        'ERR_VMDISK_VHOST_LISTEN_FAILED',
        `Failed to bind socket to ${path}: ${text}`,
        { errnoName },
      );
    }
    this.listenFd = fd;
    this.listener = pollHandle(fd, () => this.onAcceptable());
  }

  private onAcceptable(): void {
    if (this.connection || this.closing) return;
    const fd = accept(this.listenFd);
    if (fd === -EAGAIN) return;
    if (fd < 0) {
      this.error('ERR_VMDISK_VHOST_BAD_MESSAGE', `accept failed: errno ${-fd}`);
      return;
    }
    // One front-end at a time: the listener rests until it is gone.
    this.listener?.stop();
    const o = this.options;
    const conn = new VhostUserConnection(fd, {
      target: o.target,
      writable: o.writable,
      blkSize: this.blkSize,
      serial: o.serial ?? 'vhost_user_blk',
      cache: this.cache,
      numQueues: this.numQueues,
      features: blkFeatures(o.writable),
      onError: (err) => o.onError?.(err),
      onRequestError: (err) => o.onError?.(err),
    });
    this.connection = conn;
    o.onConnection?.(true);
    void conn.closed.then(() => {
      this.connection = undefined;
      o.onConnection?.(false);
      if (!this.closing) this.listener?.start({ readable: true }, () => this.onAcceptable());
    });
  }

  private error(code: `ERR_VMDISK_VHOST_${string}`, message: string): void {
    this.options.onError?.(new VhostUserError(code, message));
  }

  /** Stops: the front-end disconnected (its requests finished first), the socket removed. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.listener?.close();
      if (this.listenFd >= 0) {
        closeFd(this.listenFd);
        try {
          unlinkSync(this.options.path);
        } catch {
          // already gone
        }
      }
      await this.connection?.close();
    })();
    return this.closing;
  }
}
