import { describe, expect, it } from 'vitest';
import { EngineError } from '../src/index.ts';

describe('EngineError', () => {
  it('carries a stable code, its message and its cause', () => {
    const cause = new Error('underlying');
    const err = new EngineError('ERR_VMDISK_ENGINE_TEST', 'something failed', { cause });
    expect(err).toBeInstanceOf(Error);
    expect(err.name).toBe('EngineError');
    expect(err.code).toBe('ERR_VMDISK_ENGINE_TEST');
    expect(err.message).toBe('something failed');
    expect(err.cause).toBe(cause);
  });
});
