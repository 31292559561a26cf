import { parseArgs } from 'node:util';

export const VERSION = '0.1.0';

export function usage(): string {
  return `vm-disk ${VERSION}: the storage side of a virtual machine, in TypeScript on Node.js.

Usage: vm-disk [options]

Options:
  -h, --help     show this help and exit
  -V, --version  print the version and exit

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
  let values: { help?: boolean; version?: boolean };
  try {
    ({ values } = parseArgs({
      args: [...argv],
      options: {
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'V' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    err.write(`vm-disk: ${(e as Error).message}\nTry 'vm-disk --help'.\n`);
    return 2;
  }
  if (values.version) {
    out.write(`vm-disk ${VERSION}\n`);
    return 0;
  }
  out.write(usage());
  return 0;
}
