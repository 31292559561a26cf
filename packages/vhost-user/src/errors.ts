// The errors of @vmdisk/vhost-user: every error carries a stable `code` (messages may
// change, codes never do). Other modules of this package throw only what is defined here.
//
// Codes thrown by the server (VhostUserBlkServer):
//   ERR_VMDISK_VHOST_INVALID_ARGUMENT  a bad option (num-queues, logical-block-size...)
//   ERR_VMDISK_VHOST_LISTEN_FAILED     the unix socket could not be bound (errnoName kept)
//   ERR_VMDISK_VHOST_SERVER_CLOSED     the server is closed
// Codes carried by the server's 'error' events (the server keeps serving, other exports too):
//   ERR_VMDISK_VHOST_BAD_MESSAGE       a front-end message the protocol does not allow
//                                      (the connection is closed)
//   ERR_VMDISK_VHOST_MMAP_FAILED       a memory region could not be mapped
//   ERR_VMDISK_VHOST_DEVICE_BROKEN     the guest broke the virtqueue rules (a descriptor
//                                      chain that loops or is too long, a ring or table
//                                      outside its memory): the device stops, as QEMU's
//                                      vu_panic, and the connection is closed
//   ERR_VMDISK_VHOST_BAD_REQUEST       a virtio-blk request answered with IOERR/UNSUPP
//                                      (bad header, buffer outside guest memory, out of range)
//   ERR_VMDISK_VHOST_TARGET_ERROR      the target failed a request (the guest got IOERR)

export class VhostUserError extends Error {
  override name = 'VhostUserError';
  readonly code: string;
  /** The errno name of a failed system call ('EADDRINUSE'), when one caused this. */
  readonly errnoName?: string;

  constructor(
    code: `ERR_VMDISK_VHOST_${string}`,
    message: string,
    options?: ErrorOptions & { errnoName?: string },
  ) {
    super(message, options);
    this.code = code;
    if (options?.errnoName !== undefined) this.errnoName = options.errnoName;
  }
}
