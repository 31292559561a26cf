// Image locking, compatible with QEMU's (block/file-posix.c): one byte of the image file per
// permission, locked with open file description locks so that vm-disk and every QEMU tool
// (qemu-storage-daemon, qemu-img, qemu-io, qemu-nbd, QEMU itself) see each other's users.
//
// - byte 100 + i, shared lock: "a user here holds permission bit i";
// - byte 200 + i, shared lock: "a user here does not share permission bit i".
//
// Taking permission i is refused when another process holds byte 200 + i; refusing to share
// permission i is refused when another process holds byte 100 + i. Both kinds are shared
// (read) locks, so that any number of users may hold the same permission; the check is a
// test for an exclusive lock (F_OFD_GETLK), which any other process's shared lock blocks.

import type { EngineFile } from '@vmdisk/engine';
import { BlockError, BlockErrorCode, ImageLockError, toBlockError } from '../errors.ts';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE, permNames } from '../permissions.ts';

const PERM_BASE = 100;
const SHARED_BASE = 200;
const PERM_BITS = [0, 1, 2, 3] as const; // every bit of BLK_PERM_ALL

/** The lock bytes one open file holds for its node's permissions (QEMU's raw_handle_perm_lock). */
export class FileLocks {
  /** The permissions committed (what the parents take and share now). */
  private perm = 0;
  private shared = BLK_PERM_ALL;
  /** The bits whose bytes are locked now, per kind. */
  private lockedPerm = 0;
  private lockedUnshared = 0;

  private readonly file: EngineFile;
  private readonly path: string;

  constructor(file: EngineFile, path: string) {
    this.file = file;
    this.path = path;
  }

  /**
   * Prepares a change to (perm, shared): locks the bytes of both the old and the new
   * permissions, then checks that no other process refuses them. On refusal, goes back to
   * the old state and throws an ImageLockError.
   */
  check(perm: number, shared: number): void {
    // Only giving permissions up (nothing new to take or refuse): nothing can fail.
    if ((this.perm | perm) === this.perm && (this.shared & shared) === this.shared) return;
    try {
      this.apply(this.perm | perm, ~this.shared | ~shared, false);
      this.test(perm, shared);
    } catch (err) {
      this.abort();
      throw err;
    }
  }

  /** Commits a checked change: drops the bytes no longer needed. */
  commit(perm: number, shared: number): void {
    this.perm = perm;
    this.shared = shared;
    this.release(perm, ~shared);
  }

  /** Undoes a checked change: back to the committed permissions' bytes. */
  abort(): void {
    this.release(this.perm, ~this.shared);
  }

  private release(perm: number, unshared: number): void {
    try {
      this.apply(perm, unshared, true);
    } catch {
      // Dropping a lock cannot fail on a local file; were it to, holding a byte too many
      // only makes others more careful, so the permission change still stands.
    }
  }

  private apply(perm: number, unshared: number, unlock: boolean): void {
    for (const i of PERM_BITS) {
      const bit = 1 << i;
      this.lockedPerm = this.lockByte(PERM_BASE + i, bit, perm, this.lockedPerm, unlock);
      this.lockedUnshared = this.lockByte(
        SHARED_BASE + i,
        bit,
        unshared,
        this.lockedUnshared,
        unlock,
      );
    }
  }

  /** Locks or unlocks one byte as `wanted` says; returns the new locked set. */
  private lockByte(offset: number, bit: number, wanted: number, locked: number, unlock: boolean) {
    if (wanted & bit && !(locked & bit)) {
      this.fcntl(() => this.file.setLock('shared', offset, 1), `Failed to lock byte ${offset}`);
      return locked | bit;
    }
    if (unlock && locked & bit && !(wanted & bit)) {
      this.file.setLock('unlock', offset, 1);
      return locked & ~bit;
    }
    return locked;
  }

  private test(perm: number, shared: number): void {
    for (const i of PERM_BITS) {
      const bit = 1 << i;
      if (perm & bit && this.heldElsewhere(SHARED_BASE + i)) {
        throw new ImageLockError(`Failed to get "${permNames(bit)[0]}" lock`, this.path);
      }
    }
    for (const i of PERM_BITS) {
      const bit = 1 << i;
      if (!(shared & bit) && this.heldElsewhere(PERM_BASE + i)) {
        throw new ImageLockError(`Failed to get shared "${permNames(bit)[0]}" lock`, this.path);
      }
    }
  }

  private heldElsewhere(offset: number): boolean {
    return this.fcntl(
      () => this.file.lockConflicts('exclusive', offset, 1),
      `Failed to get lock byte ${offset}`,
    );
  }

  private fcntl<T>(call: () => T, what: string): T {
    try {
      return call();
    } catch (err) {
      const e = toBlockError(err);
      if (e.errnoName === 'EAGAIN') throw new ImageLockError(what, this.path, { cause: err });
      throw new BlockError(BlockErrorCode.IO, `${what}: ${e.errnoName}`, {
        cause: err,
        errnoName: e.errnoName,
      });
    }
  }
}

/**
 * Takes the locks QEMU takes on a file it is about to create over (file-posix's create): it
 * writes and resizes the file and lets nobody else resize it. Throws an ImageLockError,
 * before anything is written, while another process uses the file (a VM's disk is not
 * truncated under it). The locks go when the file closes.
 */
export function lockForCreate(file: EngineFile): void {
  const perm = BLK_PERM_WRITE | BLK_PERM_RESIZE;
  const shared = BLK_PERM_ALL & ~BLK_PERM_RESIZE;
  const locks = new FileLocks(file, file.path);
  locks.check(perm, shared);
  locks.commit(perm, shared);
}
