// The `raw` format driver: the guest bytes are the child's, optionally a window of it
// (offset, size). map() answers synchronously: nothing to look up.

import { type BdrvChild, defineDriver, type FormatInstance, type Mapping } from '../driver.ts';
import { BlockOptionError } from '../errors.ts';
import { int, opt } from '../schema.ts';

class RawInstance implements FormatInstance {
  readonly kind = 'format';

  private readonly file: BdrvChild;
  private readonly offset: number;
  private readonly fixedSize: number | undefined;

  constructor(file: BdrvChild, offset: number, fixedSize: number | undefined) {
    this.file = file;
    this.offset = offset;
    this.fixedSize = fixedSize;
  }

  size(): number {
    if (this.fixedSize !== undefined) return this.fixedSize;
    return Math.max(0, this.file.node.size() - this.offset);
  }

  map(offset: number, length: number): Mapping {
    return {
      length,
      kind: 'data',
      child: this.file,
      offset: offset + this.offset,
      passthrough: true,
    };
  }

  info(): Record<string, unknown> {
    return { offset: this.offset };
  }
}

export const rawDriver = defineDriver({
  name: 'raw',
  options: {
    offset: opt(int({ min: 0 })),
    size: opt(int({ min: 0 })),
  },
  children: [
    {
      key: 'file',
      required: true,
      roles: (o) =>
        o.offset !== undefined || o.size !== undefined
          ? ['data', 'primary']
          : ['data', 'filtered', 'primary'],
    },
  ],
  validate(o) {
    const { size } = o;
    if (size !== undefined && size % 512 !== 0) {
      throw new BlockOptionError('size', `${size} is not a multiple of 512`);
    }
  },
  async open(ctx) {
    const file = ctx.children.file!;
    const offset = ctx.options.offset ?? 0;
    const { size } = ctx.options;
    const fileSize = file.node.size();
    if (offset > fileSize) {
      throw new BlockOptionError(
        'offset',
        `${offset} is past the end of the file (${fileSize} bytes)`,
      );
    }
    if (size !== undefined && size > fileSize - offset) {
      throw new BlockOptionError(
        'size',
        `the sum of offset (${offset}) and size (${size}) exceeds the size of the file (${fileSize})`,
      );
    }
    return new RawInstance(file, offset, size);
  },
});
