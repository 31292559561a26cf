import { describe, expect, it } from 'vitest';
import { errnoName, errnoNumber } from '../src/errors.ts';
import { BlockError, BlockErrorCode, BlockIoError, toBlockError } from '../src/index.ts';

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

describe('errors from below', () => {
  it('keep errno, errno name and syscall, whatever shape they come in', async () => {
    const { IoError } = await import('@vmdisk/engine');
    const engine = new IoError(28, 'write', { offset: 4096, length: 512 });
    const fromEngine = toBlockError(engine, 'disk');
    expect(fromEngine).toBeInstanceOf(BlockIoError);
    expect(fromEngine).toMatchObject({
      code: 'ERR_VMDISK_BLOCK_IO',
      errno: 28,
      errnoName: 'ENOSPC',
      syscall: 'write',
      offset: 4096,
      length: 512,
      node: 'disk',
    });
    expect(fromEngine.cause).toBe(engine);
    // A Node system error: negative errno, the name in `code`.
    const node = Object.assign(new Error('ENOENT: no such file'), {
      errno: -2,
      code: 'ENOENT',
      syscall: 'open',
    });
    expect(toBlockError(node)).toMatchObject({ errno: 2, errnoName: 'ENOENT', syscall: 'open' });
    // Anything else is EIO; ours pass unchanged.
    expect(toBlockError(new Error('odd'))).toMatchObject({
      errnoName: 'EIO',
      code: 'ERR_VMDISK_BLOCK_IO',
    });
    const ours = new BlockError(BlockErrorCode.NODE_IN_USE, 'busy');
    expect(toBlockError(ours)).toBe(ours);
    expect(ours.errnoName).toBe('EBUSY');
    expect(new BlockError(BlockErrorCode.OUT_OF_BOUNDS, 'x').errnoName).toBe('EINVAL');
    expect(new BlockError(BlockErrorCode.READ_ONLY, 'x').errnoName).toBe('EPERM');
    expect(new BlockError(BlockErrorCode.NOT_SUPPORTED, 'x').errnoName).toBe('ENOTSUP');
    expect(errnoNumber('EIO')).toBe(5);
    expect(errnoName(5)).toBe('EIO');
    // Every code is stable and prefixed.
    for (const code of Object.values(BlockErrorCode))
      expect(code).toMatch(/^ERR_VMDISK_BLOCK_[A-Z_]+$/);
  });
});
