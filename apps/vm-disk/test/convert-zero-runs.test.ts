// convert's zero detection (-S): the runs of whole zero grains in a window's data, with
// grains aligned in the image (not in the buffer), on the word path and the byte path.
import { describe, expect, it } from 'vitest';
import { zeroRuns } from '../src/img/convert.ts';

/** The runs as [start, end, zero] triples, for reading the expectations. */
function runs(data: Uint8Array, offset: number, grain: number): [number, number, boolean][] {
  const { firstZero, ends } = zeroRuns(data, offset, grain);
  let start = 0;
  let zero = firstZero;
  return ends.map((end) => {
    const run: [number, number, boolean] = [start, end, zero];
    start = end;
    zero = !zero;
    return run;
  });
}

describe('zeroRuns', () => {
  it('one run for all data and for all zeros', () => {
    const data = Buffer.alloc(16384, 1);
    expect(runs(data, 0, 4096)).toEqual([[0, 16384, false]]);
    expect(runs(Buffer.alloc(16384), 0, 4096)).toEqual([[0, 16384, true]]);
  });

  it('a grain with one non-zero byte anywhere is data; neighbouring grains of a kind merge', () => {
    const data = Buffer.alloc(6 * 4096);
    data[4096 + 4095] = 1; // the last byte of grain 1
    data[4 * 4096 + 1] = 7; // inside grain 4
    data[5 * 4096 + 8] = 7;
    expect(runs(data, 0, 4096)).toEqual([
      [0, 4096, true],
      [4096, 8192, false],
      [8192, 4 * 4096, true],
      [4 * 4096, 6 * 4096, false],
    ]);
  });

  it('grains are aligned in the image: the first and last are short when the window is not', () => {
    // The window starts 1024 bytes into a grain: its first grain is 3072 bytes long.
    const data = Buffer.alloc(3072 + 4096 + 1024);
    data[3072 + 100] = 1;
    expect(runs(data, 4096 + 1024, 4096)).toEqual([
      [0, 3072, true],
      [3072, 7168, false],
      [7168, 8192, true],
    ]);
  });

  it('gives the same runs from a buffer not aligned to 4 bytes (the byte path)', () => {
    const backing = Buffer.alloc(3 * 4096 + 1);
    const data = backing.subarray(1);
    data[4096 + 2] = 9;
    expect(runs(data, 0, 4096)).toEqual([
      [0, 4096, true],
      [4096, 8192, false],
      [8192, 12288, true],
    ]);
    // A length not a multiple of 4 (the tail of an image of such a size) takes it too.
    const tail = Buffer.alloc(4096 + 6);
    tail[4096 + 5] = 1;
    expect(runs(tail, 0, 4096)).toEqual([
      [0, 4096, true],
      [4096, 4102, false],
    ]);
  });
});
