// What the generic I/O layer's requests share: bounds checks, zero buffers and zero
// detection, the kinds of driver instance, and reads clamped to a child's end.

import type { ChildNode, DriverInstance, Mapping, ProtocolInstance } from './driver.ts';
import { BlockError, BlockErrorCode } from './errors.ts';

export const ZERO_CHUNK = 1 << 20;
let zeroBuffer: Uint8Array | undefined;

export function zeros(length: number): Uint8Array {
  zeroBuffer ??= new Uint8Array(ZERO_CHUNK);
  return zeroBuffer.subarray(0, length);
}

export function isZero(buf: Uint8Array): boolean {
  // 8 bytes at a time when the view allows it.
  const n = buf.byteLength;
  let i = 0;
  if ((buf.byteOffset & 7) === 0) {
    const words = new BigUint64Array(buf.buffer, buf.byteOffset, n >>> 3);
    for (const w of words) if (w !== 0n) return false;
    i = words.length * 8;
  }
  for (; i < n; i++) if (buf[i] !== 0) return false;
  return true;
}

export function outOfBounds(
  node: string,
  offset: number,
  length: number,
  size: number,
): BlockError {
  return new BlockError(
    BlockErrorCode.OUT_OF_BOUNDS,
    `request [${offset}, +${length}) is outside node '${node}' of ${size} bytes`,
  );
}

/**
 * Checks [offset, offset + length) against size without overflow: both must be safe
 * non-negative integers and length <= size - offset. Returns the error or undefined.
 */
export function checkRequest(
  node: string,
  offset: number,
  length: number,
  size: number,
): BlockError | undefined {
  if (
    !Number.isSafeInteger(offset) ||
    !Number.isSafeInteger(length) ||
    offset < 0 ||
    length < 0 ||
    offset > size ||
    length > size - offset
  ) {
    return outOfBounds(node, offset, length, size);
  }
  return undefined;
}

/** A protocol instance (its `kind` may be left out: the smallest driver is size and pread). */
export function isProtocol(inst: DriverInstance): inst is ProtocolInstance {
  return inst.kind !== 'format' && inst.kind !== 'filter';
}

export function isNotSupported(err: unknown): boolean {
  return (
    err instanceof BlockError && (err.errnoName === 'ENOTSUP' || err.errnoName === 'EOPNOTSUPP')
  );
}

export function clampLength(n: number, max: number): number {
  return Number.isSafeInteger(n) && n > 0 && n <= max ? n : max;
}

/**
 * Where a format's mapping of `length` bytes holds them in its child, as they are: data
 * in a child (not produced by the mapping's `read`), none of it past the child's end
 * (that reads as zeros: readChildClamped). Undefined otherwise.
 */
export function mappedInChild(
  m: Mapping,
  length: number,
): { node: ChildNode; offset: number; length: number } | undefined {
  const node = m.child?.node;
  if (m.kind !== 'data' || m.read || node === undefined || m.offset === undefined) return undefined;
  const n = Math.min(m.length, length);
  if (m.offset + n > node.size()) return undefined;
  return { node, offset: m.offset, length: n };
}

/** Reads from a child, zeros for what lies past its end (as a protocol reads past EOF). */
export function readChildClamped(node: ChildNode, offset: number, buf: Uint8Array): Promise<void> {
  const size = node.size();
  const length = buf.byteLength;
  if (offset + length <= size) return node.read(offset, buf);
  if (offset >= size) {
    buf.fill(0);
    return Promise.resolve();
  }
  buf.fill(0, size - offset);
  return node.read(offset, buf.subarray(0, size - offset));
}
