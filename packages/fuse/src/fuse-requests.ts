// The requests of a FUSE export, answered as qemu-storage-daemon 7.2 answers them
// (block/export/fuse.c): one regular file, the root inode; LOOKUP finds nothing; writes to
// a read-only export fail with EACCES; writes past the end grow a growable export and are
// cut short otherwise; fallocate punches holes (KEEP_SIZE required), zeroes ranges, and
// preallocates only at the end; FLUSH (each close) and FSYNC flush the target.
import { FuseError } from './errors.ts';
import { ERRNO } from './native.ts';
import {
  attrOut,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FATTR_GID,
  FATTR_IGNORED,
  FATTR_MODE,
  FATTR_SIZE,
  FATTR_UID,
  FUSE_KERNEL_VERSION,
  IN_HEADER_SIZE,
  Init,
  initOut,
  lseekOut,
  Op,
  openOut,
  outHeader,
  parseFallocateIn,
  parseInHeader,
  parseInitIn,
  parseIo,
  parseLseekIn,
  parseSetattrIn,
  S_IFREG,
  SEEK_DATA,
  SEEK_HOLE,
  statfsOut,
  WRITE_IN_SIZE,
  writeOut,
} from './protocol.ts';
import type { FuseTarget } from './target.ts';

/** An answer is an errno (positive) or the reply's body. */
class Errno {
  readonly errno: number;
  constructor(errno: number) {
    this.errno = errno;
  }
}

/** A reply's body; `release` runs once it is written. */
type Reply = Uint8Array[] & { release?: () => void };

const err = (name: string) => new Errno(ERRNO[name]!);

/** Chunks of fallocate's zeroing (QEMU: BDRV_REQUEST_MAX_BYTES). */
const ZERO_CHUNK = 1024 * 1024 * 1024;

export interface RequestsOptions {
  target: FuseTarget;
  writable: boolean;
  growable: boolean;
  allowOther: boolean;
  maxWrite: number;
  reply: (bufs: readonly Uint8Array[]) => void;
  onError?: (err: FuseError, errno: string) => void;
}

export class FuseRequests {
  private readonly o: RequestsOptions;
  private readonly target: FuseTarget;
  private mode: number;
  private uid = process.getuid?.() ?? 0;
  private gid = process.getgid?.() ?? 0;

  constructor(o: RequestsOptions) {
    this.o = o;
    this.target = o.target;
    this.mode = S_IFREG | 0o400 | (o.writable ? 0o200 : 0);
  }

  /** Handles one request (its bytes); a promise while it runs on the target. */
  handle(req: Uint8Array): Promise<void> | undefined {
    const v = new DataView(req.buffer, req.byteOffset, req.byteLength);
    const h = parseInHeader(v);
    // No answer to these (INTERRUPT: the request runs to its end and is answered then).
    if (h.opcode === Op.FORGET || h.opcode === Op.BATCH_FORGET || h.opcode === Op.INTERRUPT) {
      return undefined;
    }
    let answer: Uint8Array[] | Errno | Promise<Uint8Array[] | Errno>;
    try {
      answer = this.dispatch(h.opcode, v, req);
    } catch (e) {
      answer = this.failed(e);
    }
    if (!(answer instanceof Promise)) {
      this.send(h.unique, answer);
      return undefined;
    }
    return answer.then(
      (a) => this.send(h.unique, a),
      (e: unknown) => this.send(h.unique, this.failed(e)),
    );
  }

  private send(unique: bigint, a: Uint8Array[] | Errno): void {
    if (a instanceof Errno) {
      this.o.reply([outHeader(unique, -a.errno, 16)]);
      return;
    }
    const len = a.reduce((n, b) => n + b.byteLength, 16);
    this.o.reply([outHeader(unique, 0, len), ...a]);
    (a as Reply).release?.();
  }

  private failed(e: unknown): Errno {
    const sys = e as { errnoName?: unknown; code?: unknown; message?: unknown };
    const name =
      typeof sys?.errnoName === 'string'
        ? sys.errnoName
        : typeof sys?.code === 'string' && sys.code in ERRNO
          ? sys.code
          : 'EIO';
    const errno = ERRNO[name] ?? ERRNO.EIO!;
    this.o.onError?.(
      new FuseError(
        'ERR_VMDISK_FUSE_TARGET_ERROR',
        `FUSE request failed: ${String(sys?.message)}`,
        {
          cause: e,
          errnoName: name,
        },
      ),
      name,
    );
    return new Errno(errno);
  }

  private dispatch(
    opcode: number,
    v: DataView,
    req: Uint8Array,
  ): Uint8Array[] | Errno | Promise<Uint8Array[] | Errno> {
    const at = IN_HEADER_SIZE;
    switch (opcode) {
      case Op.INIT:
        return this.init(v);
      case Op.LOOKUP:
        return err('ENOENT');
      case Op.GETATTR:
        return this.getattr();
      case Op.SETATTR:
        return this.setattr(v);
      case Op.OPEN:
        return [openOut()];
      case Op.RELEASE:
      case Op.DESTROY:
        return [];
      case Op.READ: {
        const { offset, size } = parseIo(v, at);
        return this.read(offset, size);
      }
      case Op.WRITE: {
        const { offset, size } = parseIo(v, at);
        const data = req.subarray(at + WRITE_IN_SIZE, at + WRITE_IN_SIZE + size);
        return this.write(offset, data);
      }
      case Op.FLUSH:
      case Op.FSYNC:
        return this.flush();
      case Op.STATFS:
        return [statfsOut()];
      case Op.FALLOCATE: {
        const { offset, length, mode } = parseFallocateIn(v, at);
        return this.fallocate(offset, length, mode);
      }
      case Op.LSEEK: {
        const { offset, whence } = parseLseekIn(v, at);
        return this.lseek(offset, whence);
      }
      default:
        return err('ENOSYS');
    }
  }

  private init(v: DataView): Uint8Array[] | Errno {
    const init = parseInitIn(v, IN_HEADER_SIZE);
    if (init.major !== FUSE_KERNEL_VERSION) return err('EPROTO');
    // What libfuse 3 (qemu-storage-daemon's) turns on by default, as far as a file needs it.
    const wanted =
      Init.ASYNC_READ | Init.BIG_WRITES | Init.MAX_PAGES | Init.AUTO_INVAL_DATA | Init.ASYNC_DIO;
    return [
      initOut({
        maxReadahead: init.maxReadahead,
        flags: init.flags & wanted,
        maxBackground: 16,
        congestionThreshold: 12,
        maxWrite: this.o.maxWrite,
        maxPages: this.o.maxWrite / 4096,
      }),
    ];
  }

  private async getattr(): Promise<Uint8Array[]> {
    const size = this.target.size();
    const allocated = (await this.target.allocatedSize?.()) ?? 0;
    return [
      attrOut(
        {
          ino: 1,
          size,
          blocks: Math.ceil((allocated > 0 ? allocated : size) / 512),
          time: Math.floor(Date.now() / 1000),
          mode: this.mode,
          uid: this.uid,
          gid: this.gid,
          blksize: this.target.blockSize?.minimum ?? 512,
        },
        1,
      ),
    ];
  }

  private async setattr(v: DataView): Promise<Uint8Array[] | Errno> {
    const a = parseSetattrIn(v, IN_HEADER_SIZE);
    let supported = FATTR_SIZE | FATTR_MODE | FATTR_IGNORED;
    if (this.o.allowOther) supported |= FATTR_UID | FATTR_GID;
    if (a.valid & ~supported) return err('ENOTSUP');
    if (a.valid & FATTR_MODE) {
      // Without allow_other nobody else can get in: no permissions for them.
      if (!this.o.allowOther && (a.mode & 0o077) !== 0) return err('EPERM');
      if (!this.o.writable && (a.mode & 0o222) !== 0) return err('EROFS');
    }
    if (a.valid & FATTR_SIZE) {
      if (!this.o.writable) return err('EACCES');
      const r = await this.truncate(a.size);
      if (r) return r;
    }
    if (a.valid & FATTR_MODE) this.mode = (a.mode & 0o7777) | S_IFREG;
    if (a.valid & FATTR_UID) this.uid = a.uid;
    if (a.valid & FATTR_GID) this.gid = a.gid;
    return this.getattr();
  }

  private async truncate(size: number): Promise<Errno | undefined> {
    if (!this.target.truncate) return err('EACCES');
    await this.target.truncate(size);
    return undefined;
  }

  private async read(offset: number, size: number): Promise<Uint8Array[] | Errno> {
    if (size > this.o.maxWrite) return err('EINVAL');
    // A short read at the end, as clients expect.
    const length = Math.max(0, Math.min(size, this.target.size() - offset));
    if (length === 0) return [];
    const t = this.target;
    const buf = t.allocBuffer?.(length) ?? new Uint8Array(length);
    const release = () => t.releaseBuffer?.(buf);
    try {
      await t.read(offset, buf);
    } catch (e) {
      release();
      throw e;
    }
    // The buffer goes back once the reply is written.
    return Object.assign([buf.subarray(0, length)], { release });
  }

  private async write(offset: number, data: Uint8Array): Promise<Uint8Array[] | Errno> {
    if (!this.o.writable) return err('EACCES');
    let size = data.byteLength;
    const length = this.target.size();
    if (offset + size > length) {
      if (this.o.growable) {
        const r = await this.truncate(offset + size);
        if (r) return r;
      } else {
        size = Math.max(0, length - offset);
      }
    }
    if (size > 0) await this.target.write!(offset, data.subarray(0, size), {});
    return [writeOut(size)];
  }

  private async flush(): Promise<Uint8Array[]> {
    await this.target.flush?.();
    return [];
  }

  private async fallocate(
    offset: number,
    len: number,
    mode: number,
  ): Promise<Uint8Array[] | Errno> {
    if (!this.o.writable) return err('EACCES');
    const size = this.target.size();
    let length = len;
    if (mode & FALLOC_FL_KEEP_SIZE) length = Math.min(length, size - offset);
    if (mode === 0) {
      // Preallocation only at the end, by growing.
      if (offset < size) return err('EOPNOTSUPP');
      return (await this.truncate(offset + length)) ?? [];
    }
    if (mode & FALLOC_FL_PUNCH_HOLE) {
      if (!(mode & FALLOC_FL_KEEP_SIZE)) return err('EINVAL');
      try {
        await this.zero(offset, length, { noHole: false, fastZero: true });
      } catch (e) {
        const code =
          (e as { errnoName?: unknown; code?: unknown }).errnoName ??
          (e as { code?: unknown }).code;
        if (code === 'ENOTSUP' || code === 'EOPNOTSUPP') return err('EOPNOTSUPP');
        throw e;
      }
      return [];
    }
    if (mode & FALLOC_FL_ZERO_RANGE) {
      if (!(mode & FALLOC_FL_KEEP_SIZE) && offset + length > size) {
        const r = await this.truncate(offset + length);
        if (r) return r;
      }
      await this.zero(offset, length, { noHole: true });
      return [];
    }
    return err('EOPNOTSUPP');
  }

  private async zero(
    offset: number,
    length: number,
    flags: { noHole: boolean; fastZero?: boolean },
  ): Promise<void> {
    const t = this.target;
    for (let at = offset, end = offset + length; at < end; at += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, end - at);
      if (t.writeZeroes) await t.writeZeroes(at, n, flags);
      else if (flags.fastZero)
        throw Object.assign(new Error('no fast zeroing'), { errnoName: 'ENOTSUP' });
      else await t.write!(at, new Uint8Array(n), {});
    }
  }

  /** SEEK_DATA / SEEK_HOLE from the target's block status (a hole past the end). */
  private async lseek(offset: number, whence: number): Promise<Uint8Array[] | Errno> {
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) return err('EINVAL');
    const size = this.target.size();
    if (offset >= size)
      return whence === SEEK_HOLE && offset === size ? [lseekOut(offset)] : err('ENXIO');
    if (!this.target.blockStatus) return [lseekOut(whence === SEEK_DATA ? offset : size)];
    let at = offset;
    while (at < size) {
      const extents = await this.target.blockStatus(at, size - at, { wantZero: true });
      if (extents.length === 0) break;
      for (const e of extents) {
        const data = !e.hole;
        if (data === (whence === SEEK_DATA)) return [lseekOut(at)];
        at += e.length;
        if (at >= size) break;
      }
    }
    return whence === SEEK_HOLE ? [lseekOut(size)] : err('ENXIO');
  }
}
