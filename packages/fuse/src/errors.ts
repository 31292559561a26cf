// The errors of @vmdisk/fuse: every error carries a stable `code` (messages may change,
// codes never do); messages are qemu-storage-daemon 7.2's where it has one.
//   ERR_VMDISK_FUSE_EXPORT_EXISTS   a FUSE export is already mounted on that path (by us)
//   ERR_VMDISK_FUSE_BAD_MOUNTPOINT  the mount point cannot be stat'ed or is not a regular file
//   ERR_VMDISK_FUSE_MOUNT_FAILED    opening /dev/fuse or mount(2) failed (errnoName kept)
//   ERR_VMDISK_FUSE_CLOSED          the export is closed
//   ERR_VMDISK_FUSE_TARGET_ERROR    a target failed a request (the kernel got an errno)

export class FuseError extends Error {
  override name = 'FuseError';
  readonly code: string;
  /** The system error's name ('EPERM') when a system call caused this. */
  readonly errnoName?: string;

  constructor(
    code: `ERR_VMDISK_FUSE_${string}`,
    message: string,
    options?: ErrorOptions & { errnoName?: string },
  ) {
    super(message, options);
    this.code = code;
    if (options?.errnoName !== undefined) this.errnoName = options.errnoName;
  }
}
