import { parseArgs } from 'node:util';
import { BadOptionError, UsageError, VmDiskError } from './errors.ts';

export const VERSION = '0.1.0';

/** The subcommands, as the error for an unknown one lists them. */
export const COMMANDS = [
  'serve',
  'demo',
  'create',
  'info',
  'map',
  'convert',
  'compare',
  'check',
  'resize',
  'dd',
  'bitmap',
  'graph',
];

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
      --export OPTIONS          export a node (type=nbd,id=ID,node-name=NODE,...)
      --object OPTIONS          an object: tls-creds-x509|tls-creds-psk,id=ID,dir=DIR,endpoint=server;
                                throttle-group,id=ID,x-iops-total=N...; secret,id=ID,data=D|file=F
      --chardev OPTIONS         a monitor socket (socket,id=ID,path=PATH,server=on,wait=off)
      --monitor OPTIONS         a QMP monitor on a chardev (chardev=ID)
      --pidfile PATH            write the process id to PATH
  vm-disk create [-f raw|qcow2] [-o KEY=VALUE,...] [-b BACKING [-F FMT]] FILE [SIZE]
                            make an image (qcow2 options as qemu-img's: cluster_size,
                            compat, lazy_refcounts, extended_l2, preallocation, refcount_bits)
  vm-disk info [--output=human|json] [-U] FILE
                            describe an image (format, sizes, backing file, qcow2 features)
  vm-disk map [--output=human|json] [-U] FILE
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
  vm-disk bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)...
                  [-g GRANULARITY] [-b SRC_FILE [-F SRC_FMT]] [-f FMT] FILE BITMAP
                            change a persistent bitmap of a qcow2 image as qemu-img bitmap does
  vm-disk dd [-f FMT] [-O raw|qcow2] [-U] [bs=SIZE] [count=N] [skip=N] if=INPUT of=OUTPUT
                            copy part of an image into a new one as qemu-img dd does
  vm-disk graph [--format dot|svg|png] [-o FILE] QMP-SOCKET
                            draw the live block graph of a running daemon (nodes, edges with
                            child names and permissions, exports, jobs): DOT, or SVG/PNG
                            through Graphviz's dot
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

/** Runs the command line; resolves to the process exit status. */
export async function main(
  argv: readonly string[],
  out: NodeJS.WritableStream = process.stdout,
  err: NodeJS.WritableStream = process.stderr,
): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'serve': {
        const { serve } = await import('./serve.ts');
        return await serve(rest);
      }
      case 'demo': {
        const { demo } = await import('./demo.ts');
        return await demo(rest, out);
      }
      case 'create':
        return await (await import('./img/create.ts')).create(rest, out);
      case 'info':
        return await (await import('./img/info.ts')).info(rest, out);
      case 'map':
        return await (await import('./img/map.ts')).map(rest, out);
      case 'convert':
        return await (await import('./img/convert.ts')).convert(rest, out);
      case 'compare':
        return await (await import('./img/compare.ts')).compare(rest, out, err);
      case 'check':
        return await (await import('./img/check.ts')).check(rest, out, err);
      case 'resize':
        return await (await import('./img/resize.ts')).resize(rest, out);
      case 'bitmap':
        return await (await import('./img/bitmap.ts')).bitmap(rest, out);
      case 'dd':
        return await (await import('./img/dd.ts')).dd(rest, out, err);
      case 'graph':
        return await (await import('./graph/graph-command.ts')).graph(rest, out);
      default:
        if (command !== undefined && !command.startsWith('-')) {
          throw new UsageError(
            `Command not found: ${command}\nKnown commands: ${COMMANDS.join(', ')}`,
          );
        }
        return topLevel(argv, out);
    }
  } catch (e) {
    if (e instanceof VmDiskError) {
      err.write(`vm-disk: ${e.message}\n`);
      if (e instanceof BadOptionError) err.write(`Try 'vm-disk --help'.\n`);
      // As qemu-img: a usage error exits 1, with where to look.
      if (e instanceof UsageError) err.write(`Try 'vm-disk --help' for more information\n`);
      return e instanceof BadOptionError ? 2 : 1;
    }
    const error = e as { code?: string; message?: string; hint?: unknown };
    err.write(`vm-disk: ${error.message ?? String(e)}${error.code ? ` (${error.code})` : ''}\n`);
    // QEMU prints hints on their own line (e.g. "Is another process using the image [x]?").
    if (typeof error.hint === 'string') err.write(`${error.hint}\n`);
    return 1;
  }
}

function topLevel(argv: readonly string[], out: NodeJS.WritableStream): number {
  let values: { help?: boolean; version?: boolean };
  try {
    ({ values } = parseArgs({
      args: [...argv],
      options: { help: { type: 'boolean', short: 'h' }, version: { type: 'boolean', short: 'V' } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    throw new BadOptionError(argv[0] ?? '', (e as Error).message.replace(/\. To specify.*$/s, ''));
  }
  if (values.version) {
    out.write(`vm-disk ${VERSION}\n`);
    return 0;
  }
  out.write(usage());
  return 0;
}
