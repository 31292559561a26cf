// koffi for the bin's bundle (tsup.config.ts points the bundle's `koffi` here): the binary
// of this platform's koffi package, loaded directly where its version is koffi's own. koffi's
// loader finds the same file through four CommonJS modules and an ELF read of node's binary
// to tell glibc from musl: 6-7 ms of every start, against 1.5 for the binary alone. Anywhere
// the direct path fails (musl, another layout, a version mismatch) koffi's loader runs.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import type * as Koffi from 'koffi';

const require = createRequire(import.meta.url);

function load(): typeof Koffi {
  try {
    const { platform, arch } = process;
    const native = require(`@koromix/koffi-${platform}-${arch}/${platform}_${arch}/koffi.node`);
    const pkg = JSON.parse(
      readFileSync(join(dirname(require.resolve('koffi')), 'package.json'), 'utf8'),
    ) as { version: string };
    if (native.version === pkg.version) return native as typeof Koffi;
  } catch {
    // koffi's own loader below.
  }
  return require('koffi') as typeof Koffi;
}

export default load();
