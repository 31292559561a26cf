// Test data that is cheap to make again: bytes that depend on a seed and their position.

/** Fills `buf` with bytes that depend on `seed` and the position (xorshift32); returns it. */
export function fillPattern<T extends Uint8Array>(buf: T, seed: number): T {
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = x & 0xff;
  }
  return buf;
}
