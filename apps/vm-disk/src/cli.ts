#!/usr/bin/env -S node --max-semi-space-size=1
// The flag is the bin's, not the packages' (they run embedded with the embedder's flags):
// V8's young generation capped at 1 MB semi-spaces cuts idle RSS by ~1.5 MB, and measured
// less CPU per request under load, not more (docs/architecture.md "Memory").
import { main } from './main.ts';

process.exitCode = await main(process.argv.slice(2));
