#!/usr/bin/env node
import module from 'node:module';

// V8's compile cache (Node 22.1+): later runs load the bundle's compiled code instead of
// parsing it again. Enabled before main is imported so that every chunk is cached.
module.enableCompileCache?.();
const { main } = await import('./main.ts');
process.exitCode = await main(process.argv.slice(2));
