// The cache mode (-t/-T, convert's target default 'unsafe') applies to --image-opts images
// as to file names, as in qemu-img: a default the string's own cache.* options override.
import { describe, expect, it } from 'vitest';
import { nodeOptions } from '../src/img/open.ts';

describe('cache mode of --image-opts images', () => {
  it('is the top node default, inherited by its file', async () => {
    const opts = 'driver=raw,file.driver=file,file.filename=/nonexistent.img';
    expect(
      await nodeOptions({ name: opts, imageOpts: true, readOnly: false, cache: 'unsafe' }),
    ).toMatchObject({ driver: 'raw', cache: { 'no-flush': 'on' } });
    expect(
      await nodeOptions({ name: opts, imageOpts: true, readOnly: false, cache: 'none' }),
    ).toMatchObject({ cache: { direct: 'on' } });
    const plain = await nodeOptions({ name: opts, imageOpts: true, readOnly: false });
    expect(plain.cache).toBeUndefined();
  });

  it("gives way to the string's cache options", async () => {
    const opts = 'driver=raw,cache.no-flush=off,file.driver=file,file.filename=/nonexistent.img';
    expect(
      await nodeOptions({ name: opts, imageOpts: true, readOnly: false, cache: 'unsafe' }),
    ).toMatchObject({ cache: { 'no-flush': 'off' } });
  });
});
