// The one vitest configuration every project uses: its vitest.config.ts re-exports it.
// Each run writes a JSON report that scripts/test-summary.mjs adds up.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    reporters: ['default', ['json', { outputFile: '.reports/vitest.json' }]],
    allowOnly: false,
    testTimeout: 30_000,
    hookTimeout: 120_000,
  },
});
