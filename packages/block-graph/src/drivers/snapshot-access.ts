// The `snapshot-access` driver (QEMU 7.2 block/snapshot-access.c): reads the point-in-time
// a copy-before-write node keeps (its `file` child): copied clusters from the filter's
// target, the others from its source. Image fleecing exports it over NBD read-only while
// the guest goes on writing through the filter. It takes no permissions on its child.
import type { BdrvChild, BlockDriver, ProtocolInstance, ProtocolStatus } from '../driver.ts';
import { BlockError, BlockErrorCode } from '../errors.ts';
import { BLK_PERM_ALL } from '../permissions.ts';
import { type CopyBeforeWriteInstance, copyBeforeWriteOf } from './copy-before-write.ts';

class SnapshotAccessInstance implements ProtocolInstance {
  readonly kind = 'protocol';
  readonly #file: BdrvChild;

  constructor(file: BdrvChild) {
    this.#file = file;
  }

  /** The filter below (looked up each time: a graph change may repoint the edge). */
  get #cbw(): CopyBeforeWriteInstance {
    const cbw = copyBeforeWriteOf(this.#file.node);
    if (!cbw) {
      throw new BlockError(BlockErrorCode.NOT_SUPPORTED, 'Operation not supported', {
        errnoName: 'ENOTSUP',
      });
    }
    return cbw;
  }

  size(): number {
    return this.#file.node.size();
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    try {
      return this.#cbw.snapshotRead(offset, buf);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  blockStatus(offset: number, length: number): Promise<ProtocolStatus> {
    try {
      return this.#cbw.snapshotBlockStatus(offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
  }
}

export const snapshotAccessDriver: BlockDriver = {
  name: 'snapshot-access',
  options: {},
  children: [{ key: 'file', required: true, roles: () => ['data', 'primary'] }],
  // It reads through the filter's own API, not the child's I/O (snapshot_access_child_perm).
  childPerms: () => ({ perm: 0, shared: BLK_PERM_ALL }),
  async open(ctx) {
    return new SnapshotAccessInstance(ctx.children.file!);
  },
};
