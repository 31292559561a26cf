import { describe, expect, it } from 'vitest';
import { AoError } from '../src/index.ts';

describe('AoError', () => {
  it('carries a stable code, its message and its cause', () => {
    const cause = new Error('underlying');
    const err = new AoError('ERR_VMDISK_AO_TEST', 'something failed', { cause });
    expect(err).toBeInstanceOf(Error);
    expect(err.name).toBe('AoError');
    expect(err.code).toBe('ERR_VMDISK_AO_TEST');
    expect(err.message).toBe('something failed');
    expect(err.cause).toBe(cause);
  });
});
