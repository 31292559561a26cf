// `vm-disk check` (to come: as `qemu-img check`).
import { ImageCommandError } from '../errors.ts';
import { imgArgs } from './args.ts';

export async function check(
  argv: readonly string[],
  _out: NodeJS.WritableStream,
  _err: NodeJS.WritableStream,
): Promise<number> {
  imgArgs(argv, {});
  throw new ImageCommandError('check: not implemented yet');
}
