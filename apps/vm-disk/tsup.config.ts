import { defineConfig } from 'tsup';

export default defineConfig([
  // The package: `main` for embedders, the bin's launcher, and the iothreads' worker (a
  // worker thread loads it as an ES module).
  {
    entry: ['src/index.ts', 'src/cli.ts', 'src/iothreads/worker.ts'],
    format: ['esm'],
    dts: { entry: 'src/index.ts' },
    sourcemap: true,
    target: 'node22',
  },
  // The bin's CLI: main.ts and every workspace package in one CommonJS script, which
  // cli.ts compiles through a code cache (bundle-loader.ts). koffi stays a package (native
  // code) and is loaded by koffi-direct.ts; pino-pretty is required only on a terminal.
  {
    entry: { 'vm-disk': 'src/main.ts' },
    format: ['cjs'],
    outExtension: () => ({ js: '.cjs' }),
    noExternal: [/^@vmdisk\//],
    external: ['pino-pretty'],
    shims: true,
    splitting: false,
    sourcemap: true,
    target: 'node22',
    esbuildOptions(options) {
      options.alias = { koffi: './src/koffi-direct.ts' };
    },
  },
]);
