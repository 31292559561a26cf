#!/usr/bin/env -S node --max-semi-space-size=1
// The flag is the bin's, not the packages' (they run embedded with the embedder's flags):
// V8's young generation capped at 1 MB semi-spaces cuts idle RSS by ~1.5 MB, and measured
// less CPU per request under load, not more (docs/architecture.md "Memory").
import module from 'node:module';
import { fileURLToPath } from 'node:url';
import { loadBundle } from './bundle-loader.ts';

// Node's compile cache, for what loads as ES modules: the daemon and its iothreads' workers.
module.enableCompileCache?.();
const argv = process.argv.slice(2);
// A command: the CLI and its packages as one script beside this one, through our code
// cache (bundle-loader.ts). The daemon: as ES modules, loading only what it uses; V8 keeps
// the source of what it loaded, and the whole bundle's source (every command's, 1.1 MB)
// added ~1.2 MiB to its idle RSS, where its start-up is paid once.
const main =
  argv[0] === 'serve'
    ? (await import('./main.ts')).main
    : loadBundle(fileURLToPath(new URL('./vm-disk.cjs', import.meta.url)), argv);

process.exitCode = await main(argv);
