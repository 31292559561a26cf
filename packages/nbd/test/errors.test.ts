import { describe, expect, it } from 'vitest';
import { NbdError } from '../src/index.ts';

describe('NbdError', () => {
  it('carries a stable code, its message and its cause', () => {
    const cause = new Error('underlying');
    const err = new NbdError('ERR_VMDISK_NBD_TEST', 'something failed', { cause });
    expect(err).toBeInstanceOf(Error);
    expect(err.name).toBe('NbdError');
    expect(err.code).toBe('ERR_VMDISK_NBD_TEST');
    expect(err.message).toBe('something failed');
    expect(err.cause).toBe(cause);
  });
});
