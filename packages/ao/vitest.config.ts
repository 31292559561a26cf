// The shared settings (JSON reporter included) plus this package's global after-each
// check that no test leaves an asynchronous operation live.
import { defineConfig, mergeConfig } from 'vitest/config';
import shared from '../../vitest.shared.ts';

export default mergeConfig(
  shared,
  defineConfig({
    test: {
      setupFiles: ['./test/setup.ts'],
    },
  }),
);
