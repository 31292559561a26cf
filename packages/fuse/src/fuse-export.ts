// A FUSE export: a target appears as a regular file mounted over `mountpoint`, as
// qemu-storage-daemon's `--export type=fuse`. The FUSE protocol is spoken on /dev/fuse
// directly (no libfuse: the kernel side of one regular file is a dozen requests, and
// libfuse's session loop would want threads of its own): the fd is non-blocking and a
// koffi poll handle wakes the event loop's own epoll when a request is there. Requests run
// concurrently, up to MAX_IN_FLIGHT; then reading stops until one is done.
import { closeSync, constants as fsc, openSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import koffi, { type node } from 'koffi';
import { FuseError } from './errors.ts';
import { FuseRequests } from './fuse-requests.ts';
import * as native from './native.ts';
import { IN_HEADER_SIZE, WRITE_IN_SIZE } from './protocol.ts';
import type { FuseTarget } from './target.ts';
import { tellWatchdog } from './watchdog.ts';

export type AllowOther = 'on' | 'off' | 'auto';

export interface FuseExportOptions {
  /** An existing regular file the export is mounted over. */
  mountpoint: string;
  target: FuseTarget;
  writable: boolean;
  /** Writes past the end grow the target (else they are cut short at the end). */
  growable?: boolean;
  /** Other users may access the file (mount option allow_other); auto: if mounting allows. */
  allowOther?: AllowOther;
  /** The largest WRITE (and READ) request, a multiple of 4 KiB; default 1 MiB. */
  maxWrite?: number;
  /** A request the target failed (the kernel got `errno`); the export keeps serving. */
  onError?: (err: FuseError, errno: string) => void;
}

/** Requests handled at once; beyond, /dev/fuse is not read until one is done. */
const MAX_IN_FLIGHT = 64;
const DEFAULT_MAX_WRITE = 1024 * 1024;

/** Mount points of this process's exports, as given (qemu-storage-daemon's `exports` table). */
const mounted = new Set<string>();

export class FuseExport {
  readonly mountpoint: string;
  /** Whether the mount has allow_other. */
  readonly allowOther: boolean;
  private readonly absolute: string;
  private fd: number;
  private readonly poll: node.PollHandle;
  private readonly requests: FuseRequests;
  private readonly readBuffer: Uint8Array;
  private readonly inFlight = new Set<Promise<void>>();
  private paused = false;
  private closing: Promise<void> | undefined;

  private constructor(
    options: FuseExportOptions,
    fd: number,
    allowOther: boolean,
    maxWrite: number,
  ) {
    this.mountpoint = options.mountpoint;
    this.absolute = resolve(options.mountpoint);
    this.allowOther = allowOther;
    this.fd = fd;
    this.readBuffer = new Uint8Array(maxWrite + IN_HEADER_SIZE + WRITE_IN_SIZE + 4096);
    this.requests = new FuseRequests({
      target: options.target,
      writable: options.writable && options.target.write !== undefined,
      growable: options.growable ?? false,
      allowOther,
      maxWrite,
      reply: (bufs) => this.reply(bufs),
      ...(options.onError && { onError: options.onError }),
    });
    this.poll = koffi.node.poll(fd, { readable: true }, () => this.onReadable());
  }

  /** Mounts an export; errors in qemu-storage-daemon 7.2's words. */
  static async mount(options: FuseExportOptions): Promise<FuseExport> {
    const { mountpoint } = options;
    const maxWrite = options.maxWrite ?? DEFAULT_MAX_WRITE;
    if (!(Number.isInteger(maxWrite) && maxWrite >= 4096 && maxWrite % 4096 === 0)) {
      throw new FuseError('ERR_VMDISK_FUSE_BAD_OPTION', 'maxWrite must be a multiple of 4 KiB');
    }
    // Before the stat: a stat of our own mount would wait for this very thread's reply.
    if (mounted.has(mountpoint)) {
      throw new FuseError(
        'ERR_VMDISK_FUSE_EXPORT_EXISTS',
        `There already is a FUSE export on '${mountpoint}'`,
      );
    }
    mounted.add(mountpoint);
    try {
      await checkRegularFile(mountpoint);
      const allow = options.allowOther ?? 'auto';
      let mountedWith: { fd: number; allowOther: boolean };
      if (allow === 'auto') {
        try {
          mountedWith = mountFuse(mountpoint, true, maxWrite);
        } catch {
          mountedWith = mountFuse(mountpoint, false, maxWrite);
        }
      } else {
        mountedWith = mountFuse(mountpoint, allow === 'on', maxWrite);
      }
      tellWatchdog('mount', resolve(mountpoint));
      return new FuseExport(options, mountedWith.fd, mountedWith.allowOther, maxWrite);
    } catch (e) {
      mounted.delete(mountpoint);
      throw e;
    }
  }

  /** Requests being handled now. */
  get requestsInFlight(): number {
    return this.inFlight.size;
  }

  private onReadable(): void {
    while (this.fd >= 0 && this.inFlight.size < MAX_IN_FLIGHT) {
      const n = native.read(this.fd, this.readBuffer);
      if (n === -native.ERRNO.EAGAIN!) return;
      // ENOENT: the request was interrupted before we read it; EINTR: try again.
      if (n === -native.ERRNO.ENOENT! || n === -native.ERRNO.EINTR!) continue;
      if (n < 0) {
        // ENODEV: unmounted behind our back (umount, or the connection aborted).
        this.stopReading();
        return;
      }
      // The request's own copy: the read buffer is reused for the next one.
      const request = this.readBuffer.slice(0, n);
      const done = this.requests.handle(request);
      if (done) {
        this.inFlight.add(done);
        void done.finally(() => {
          this.inFlight.delete(done);
          if (this.paused && this.fd >= 0) {
            this.paused = false;
            this.poll.start(() => this.onReadable());
          }
        });
      }
    }
    if (this.fd >= 0) {
      this.paused = true;
      this.poll.stop();
    }
  }

  private stopReading(): void {
    this.poll.stop();
    this.paused = false;
  }

  private reply(bufs: readonly Uint8Array[]): void {
    if (this.fd < 0) return;
    // ENOENT: the request was interrupted (its answer is not wanted any more).
    native.writev(this.fd, bufs);
  }

  /**
   * Unmounts: the connection is closed first (as libfuse does: an unmount waiting for our
   * answer on this thread could not get it), then the mount detached. Resolves when the
   * requests still running on the target are done.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.poll.close();
      closeSync(this.fd);
      this.fd = -1;
      native.umount2(this.absolute, native.MNT_DETACH);
      tellWatchdog('umount', this.absolute);
      mounted.delete(this.mountpoint);
      await Promise.allSettled([...this.inFlight]);
    })();
    return this.closing;
  }
}

async function checkRegularFile(path: string): Promise<void> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new FuseError(
      'ERR_VMDISK_FUSE_BAD_MOUNTPOINT',
      `Failed to stat '${path}': ${strerror(err.code)}`,
      { cause: e, ...(err.code !== undefined && { errnoName: err.code }) },
    );
  }
  if (!st.isFile()) {
    throw new FuseError('ERR_VMDISK_FUSE_BAD_MOUNTPOINT', `'${path}' is not a regular file`);
  }
}

const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  ENOTDIR: 'Not a directory',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  ENOTCONN: 'Transport endpoint is not connected',
};

function strerror(code: string | undefined): string {
  return (code && STRERROR[code]) ?? code ?? 'Unknown error';
}

/** Opens /dev/fuse and mounts it over `mountpoint` (libfuse's fuse_kern_mount, as root). */
function mountFuse(
  mountpoint: string,
  allowOther: boolean,
  maxWrite: number,
): { fd: number; allowOther: boolean } {
  let fd: number;
  try {
    // libuv opens with O_CLOEXEC: no child (the watchdog) holds the connection open.
    fd = openSync('/dev/fuse', fsc.O_RDWR | fsc.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new FuseError('ERR_VMDISK_FUSE_MOUNT_FAILED', 'Failed to mount FUSE session to export', {
      cause: e,
      ...(code !== undefined && { errnoName: code }),
    });
  }
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const data = [
    `fd=${fd}`,
    'rootmode=100000',
    `user_id=${uid}`,
    `group_id=${gid}`,
    'default_permissions',
    ...(allowOther ? ['allow_other'] : []),
    `max_read=${maxWrite}`,
  ].join(',');
  const r = native.mount(
    'vm-disk',
    resolve(mountpoint),
    'fuse',
    native.MS_NOSUID | native.MS_NODEV,
    data,
  );
  if (r < 0) {
    closeSync(fd);
    throw new FuseError('ERR_VMDISK_FUSE_MOUNT_FAILED', 'Failed to mount FUSE session to export', {
      errnoName: native.errnoName(-r),
    });
  }
  return { fd, allowOther };
}
