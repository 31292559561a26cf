import { describe, expect, it } from 'vitest';
import { BlockError } from '../src/index.ts';

describe('BlockError', () => {
  it('carries a stable code, its message and its cause', () => {
    const cause = new Error('underlying');
    const err = new BlockError('ERR_VMDISK_BLOCK_TEST', 'something failed', { cause });
    expect(err).toBeInstanceOf(Error);
    expect(err.name).toBe('BlockError');
    expect(err.code).toBe('ERR_VMDISK_BLOCK_TEST');
    expect(err.message).toBe('something failed');
    expect(err.cause).toBe(cause);
  });
});
