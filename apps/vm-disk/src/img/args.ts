// Command-line parsing for the image subcommands, with qemu-img's words for what it
// refuses ("unrecognized option '--frob'"), which exit with status 1 as qemu-img's do.
import { type ParseArgsOptionsConfig, parseArgs } from 'node:util';
import { UsageError } from '../errors.ts';

export function imgArgs<const T extends ParseArgsOptionsConfig>(
  argv: readonly string[],
  options: T,
) {
  try {
    return parseArgs({ args: [...argv], options, allowPositionals: true, strict: true });
  } catch (e) {
    const err = e as { code?: string; message: string };
    const named = /'(-[^']*)'/.exec(err.message)?.[1] ?? '';
    if (err.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') {
      // qemu-img words short and long options alike.
      throw new UsageError(`unrecognized option '${named}'`, { cause: e });
    }
    if (err.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
      const opt = /(--?[\w-]+)/.exec(err.message)?.[1] ?? named;
      throw new UsageError(`missing argument for option '${opt}'`, { cause: e });
    }
    throw new UsageError(err.message, { cause: e });
  }
}

/** A number option (-m 16), refused with qemu-img's message when it is not one. */
export function intArg(
  text: string | undefined,
  what: string,
  min: number,
  max: number,
): number | undefined {
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) {
    throw new UsageError(`Invalid ${what}. Allowed ${what} is between ${min} and ${max}`);
  }
  return n;
}

/** --output: human or json. */
export function outputFormat(text: string | undefined): 'human' | 'json' {
  if (text === undefined || text === 'human') return 'human';
  if (text === 'json') return 'json';
  throw new UsageError(`--output must be used with human or json as argument.`);
}

/**
 * The command line `info` and `map` share: FILE, `--output human|json`, `-U`, `-f`;
 * info's `--backing-chain`, map's `--start-offset` and `--max-length`. A bad option exits
 * with status 1, as qemu-img's.
 */
export function imageArgs(command: 'info' | 'map', argv: readonly string[]) {
  const { values, positionals } = imgArgs(argv, {
    output: { type: 'string' },
    'force-share': { type: 'boolean', short: 'U', default: false },
    format: { type: 'string', short: 'f' },
    object: { type: 'string', multiple: true, default: [] },
    'image-opts': { type: 'boolean', default: false },
    ...(command === 'info'
      ? { 'backing-chain': { type: 'boolean', default: false } }
      : { 'start-offset': { type: 'string' }, 'max-length': { type: 'string' } }),
  } as const);
  const json = outputFormat(values.output) === 'json';
  if (positionals.length !== 1) throw new UsageError('Expecting one image file name');
  const v = values as typeof values & {
    'backing-chain'?: boolean;
    'start-offset'?: string;
    'max-length'?: string;
  };
  return {
    path: positionals[0]!,
    json,
    forceShare: values['force-share'],
    format: values.format,
    objects: values.object,
    imageOpts: values['image-opts'],
    backingChain: v['backing-chain'] ?? false,
    startOffset: v['start-offset'],
    maxLength: v['max-length'],
  };
}
