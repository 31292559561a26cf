// pageAlignedBuffer: plain memory that starts at a page boundary, whatever malloc gives.
import koffi from 'koffi';
import { describe, expect, it } from 'vitest';
import { EngineError, pageAlignedBuffer } from '../src/index.ts';

describe('pageAlignedBuffer', () => {
  it('starts at a page boundary, has the length asked and is its own memory', () => {
    for (const length of [1, 512, 4096, 65537, 2 << 20, 32 << 20]) {
      const buf = pageAlignedBuffer(length);
      expect(Number(koffi.address(buf)) % 4096).toBe(0);
      expect(buf.length).toBe(length);
      buf.fill(0xa5);
      expect(buf[0]).toBe(0xa5);
      expect(buf[length - 1]).toBe(0xa5);
      // Never a slice of Node's shared pool: no other Buffer's bytes share its memory.
      expect(buf.buffer.byteLength).toBe(length + 4096);
    }
  });

  it('refuses a length that is not a positive integer', () => {
    for (const length of [0, -1, 1.5, Number.NaN]) {
      expect(() => pageAlignedBuffer(length)).toThrow(EngineError);
    }
  });
});
