#!/usr/bin/env -S node --max-semi-space-size=1
// The flag is the bin's, not the packages' (they run embedded with the embedder's flags):
// V8's young generation capped at 1 MB semi-spaces cuts idle RSS by ~1.5 MB, and measured
// less CPU per request under load, not more (docs/architecture.md "Memory").
import module from 'node:module';

// V8's compile cache (in os.tmpdir()/node-compile-cache, keyed by Node version and file
// content): a later run loads the bundles' compiled code instead of parsing and compiling
// them again. Enabled before main is imported, so that every chunk and package is cached.
// A short command pays its start-up in full: `convert` of a 1 MiB image, 0.100 -> 0.080 s
// (median of 12, alternated), its CPU 0.095 -> 0.080 s.
module.enableCompileCache?.();
const { main } = await import('./main.ts');

process.exitCode = await main(process.argv.slice(2));
