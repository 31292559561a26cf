import { parseArgs } from 'node:util';
import { BadOptionError, UsageError, VmDiskError } from './errors.ts';

import { usage } from './usage.ts';
import { VERSION } from './version.ts';

export { usage, VERSION };

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
  'snapshot',
  'amend',
  'bench',
  'commit',
  'rebase',
  'measure',
];

/** The subcommands of qemu-img's (a bad option exits 1, as qemu-img's). */
const IMAGE_COMMANDS = new Set(
  COMMANDS.filter((c) => c !== 'serve' && c !== 'demo' && c !== 'graph'),
);

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
      case 'snapshot':
        return await (await import('./img/snapshot.ts')).snapshot(rest, out);
      case 'amend':
        return await (await import('./img/amend.ts')).amend(rest, out);
      case 'bench':
        return await (await import('./img/bench.ts')).bench(rest, out);
      case 'commit':
        return await (await import('./img/commit.ts')).commit(rest, out);
      case 'rebase':
        return await (await import('./img/rebase.ts')).rebase(rest, out);
      case 'measure':
        return await (await import('./img/measure.ts')).measure(rest, out);
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
      // The daemon's bad options exit 2; an image subcommand's exit 1, as qemu-img's.
      return e instanceof BadOptionError && !IMAGE_COMMANDS.has(command ?? '') ? 2 : 1;
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
