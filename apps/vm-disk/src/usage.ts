// The text `vm-disk --help` prints (and qemu-img-style subcommands print on bad use).
import { VERSION } from './version.ts';

export function usage(): string {
  return `vm-disk ${VERSION}: the storage side of a virtual machine, in TypeScript on Node.js.

Usage:
  vm-disk demo [--dir DIR] [--port N]
                            the built-in default: make a base image and a qcow2 overlay
                            (once) in DIR (.vm-disk/demo) and serve the overlay over NBD on
                            127.0.0.1:10809 with a QMP monitor
  vm-disk serve [options]   serve disk images over NBD, with a QMP monitor; takes
                            qemu-storage-daemon's options:
      --blockdev OPTIONS        add a block node (JSON or key=value,...)
      --nbd-server OPTIONS      start the NBD server (addr.type=inet|unix,...)
      --export OPTIONS          export a node (type=nbd|fuse,id=ID,node-name=NODE,...)
      --object OPTIONS          an object: tls-creds-x509|tls-creds-psk,id=ID,dir=DIR,endpoint=server;
                                throttle-group,id=ID,x-iops-total=N...; secret,id=ID,data=D|file=F
      --chardev OPTIONS         a monitor socket (socket,id=ID,path=PATH,server=on,wait=off)
      --monitor OPTIONS         a QMP monitor on a chardev (chardev=ID)
      --pidfile PATH            write the process id to PATH
      --metrics OPTIONS         Prometheus metrics at /metrics, health at /healthz
                                (addr.type=inet,addr.host=H,addr.port=P | addr.type=unix,addr.path=P)
  vm-disk create [-f raw|qcow2] [-o KEY=VALUE,...] [-b BACKING [-F FMT]] FILE [SIZE]
                            make an image (qcow2 options as qemu-img's: cluster_size,
                            compat, lazy_refcounts, extended_l2, preallocation, refcount_bits)
  vm-disk info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE
                            describe an image (format, sizes, backing file, qcow2 features)
  vm-disk map [--output=human|json] [-f FMT] [--start-offset=N] [--max-length=N] [-U] FILE
                            where the image's data is: allocated, zero, or unallocated, by depth
                            (-U, --force-share: read an image another process may be writing;
                            without it, an image in use is refused, as qemu-img refuses it)
  vm-disk convert [-f FMT] [-O raw|qcow2] [-o K=V,...] [-B BACKING [-F FMT]] [-c] [-n]
                  [--target-is-zero] [-W] [-m N] [-S SIZE] [-t CACHE] [-T CACHE] [-p] [-U]
                  [--object OPTS] [--image-opts] [--target-image-opts] SRC DST
                            copy an image as qemu-img convert does (sparse; -c compressed
                            qcow2); SRC and DST may be nbd://HOST[:PORT]/EXPORT or
                            nbd+unix:///EXPORT?socket=PATH
  vm-disk compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B
                            whether two images read the same (exit 0 same, 1 different, 2 error)
  vm-disk check [-f FMT] [-r leaks|all] [--output=human|json] [-q] [-U] FILE
                            check (and repair) a qcow2 image as qemu-img check does (exit 0
                            clean, 1 failed, 2 corruptions, 3 leaks, 63 no checks for the format)
  vm-disk resize [-f FMT] [--shrink] [-q] FILE [+|-]SIZE
                            change an image's virtual size as qemu-img resize does
  vm-disk commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-r RATE] [-p] [-q] FILE
                            write an image's data into its backing file (or BASE) as
                            qemu-img commit does; the image is emptied unless -d or -b
  vm-disk rebase [-f FMT] [-F FMT] [-t CACHE] [-T CACHE] [-u] [-p] [-q] [-U] -b BACKING FILE
                            give an image another backing file as qemu-img rebase does:
                            safe mode copies what differs first; -b '' flattens; -u only
                            rewrites the header
  vm-disk measure [--output=human|json] [-O raw|qcow2] [-o OPTIONS] [--size N | [-f FMT] [-U] FILE]
                            the size a new image needs (required, fully allocated) as
                            qemu-img measure computes it
  vm-disk bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)...
                  [-g GRANULARITY] [-b SRC_FILE [-F SRC_FMT]] [-f FMT] FILE BITMAP
                            change a persistent bitmap of a qcow2 image as qemu-img bitmap does
  vm-disk dd [-f FMT] [-O raw|qcow2] [-U] [bs=SIZE] [count=N] [skip=N] if=INPUT of=OUTPUT
                            copy part of an image into a new one as qemu-img dd does
  vm-disk graph [--format dot|svg|png] [-o FILE] QMP-SOCKET
                            draw the live block graph of a running daemon (nodes, edges with
                            child names and permissions, exports, jobs): DOT, or SVG/PNG
                            through Graphviz's dot
  vm-disk snapshot [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-q] [-U] FILE
                            list, create, apply or delete a qcow2 image's internal snapshots
                            as qemu-img snapshot does
  vm-disk amend [-f FMT] [-p] [-q] [--force] -o compat=..,lazy_refcounts=..,refcount_bits=..,size=.. FILE
                            change a qcow2 image's options in place as qemu-img amend does
  vm-disk bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w] [--pattern=N]
                [--flush-interval=N] [--no-drain] [-t CACHE] [-i AIO] [-f FMT] [-U] FILE
                            run a simple I/O benchmark on an image as qemu-img bench does
  vm-disk --help | --version

Logs go to stderr: JSON lines, or readable lines on a terminal (VMDISK_LOG_FORMAT=json|pretty,
VMDISK_LOG_LEVEL=debug|info|warn|error).

Packages (usable one by one from a Node program):
  @vmdisk/engine       block I/O through io_uring, Linux AIO or the thread pool
  @vmdisk/block-graph  block nodes (file, raw, qcow2, bochs, filters) and the generic I/O layer
  @vmdisk/nbd          NBD server and client
  @vmdisk/ao           asynchronous operations and QEMU-style jobs
`;
}
