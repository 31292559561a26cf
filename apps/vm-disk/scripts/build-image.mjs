// Builds the vm-disk container image: bundles the CLI and the workspace packages it uses
// into one ES module (koffi stays a package: it carries native code), stages it with a
// `vm-disk` launcher, and runs `docker build` with the Dockerfile beside this script's
// folder. Run after the workspace is built (`nx run vm-disk:build`).
// Usage: node scripts/build-image.mjs [--base IMAGE] [--tag TAG] [--stage-only DIR]
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { build } from 'esbuild';

const app = join(import.meta.dirname, '..');
const { values } = parseArgs({
  options: {
    base: { type: 'string', default: 'node:24-bookworm-slim' },
    tag: { type: 'string', default: 'vm-disk:latest' },
    'stage-only': { type: 'string' },
  },
});

const stage = values['stage-only'] ?? mkdtempSync(join(tmpdir(), 'vm-disk-image-'));
rmSync(stage, { recursive: true, force: true });
mkdirSync(join(stage, 'bin'), { recursive: true });

await build({
  entryPoints: [join(app, 'src/cli.ts')],
  outfile: join(stage, 'lib/vm-disk.mjs'),
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node22',
  external: ['koffi'],
  // CommonJS dependencies bundled into an ES module need a `require`.
  banner: {
    js: "import { createRequire as __vmdiskRequire } from 'node:module'; const require = __vmdiskRequire(import.meta.url);",
  },
  logLevel: 'warning',
});

/** The folder of package `name` as `from` resolves it (its exports may hide package.json). */
function packageDir(from, name) {
  let dir = dirname(realpathSync(createRequire(from).resolve(name)));
  while (
    !existsSync(join(dir, 'package.json')) ||
    JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')).name !== name
  ) {
    if (dir === dirname(dir)) throw new Error(`cannot find the folder of ${name}`);
    dir = dirname(dir);
  }
  return dir;
}

// koffi and its native binary for this platform, resolved as the engine resolves them.
const koffiDir = packageDir(join(app, '../../packages/engine/package.json'), 'koffi');
cpSync(koffiDir, join(stage, 'lib/node_modules/koffi'), { recursive: true });
const native = `@koromix/koffi-${process.platform}-${process.arch}`;
cpSync(
  packageDir(join(koffiDir, 'package.json'), native),
  join(stage, 'lib/node_modules', native),
  { recursive: true },
);

writeFileSync(
  join(stage, 'bin/vm-disk'),
  '#!/bin/sh\nexec node /opt/vm-disk/lib/vm-disk.mjs "$@"\n',
);
chmodSync(join(stage, 'bin/vm-disk'), 0o755);
cpSync(join(app, 'Dockerfile'), join(stage, 'Dockerfile'));

if (values['stage-only']) {
  console.log(stage);
} else {
  try {
    execFileSync(
      'docker',
      ['build', '-q', '--build-arg', `BASE=${values.base}`, '-t', values.tag, stage],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
  } catch (e) {
    process.stderr.write(e.stderr ?? '');
    throw e;
  }
  rmSync(stage, { recursive: true, force: true });
  console.log(values.tag);
}
