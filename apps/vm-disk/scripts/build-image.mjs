// Builds the vm-disk container image: bundles the bin with esbuild (its daemon path and the
// workspace packages it uses in one ES module; koffi stays a package: it carries native
// code), stages it with the other commands' script as the build made it (dist/vm-disk.cjs)
// and a `vm-disk` launcher, and runs `docker build` with the Dockerfile beside this
// script's folder. Run after the workspace is built (`nx run vm-disk:build`).
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const USAGE = `Usage: node apps/vm-disk/scripts/build-image.mjs [--base IMAGE] [--tag TAG] [--stage-only DIR]

Bundles the vm-disk CLI and builds its container image with docker; prints the tag.

  --base IMAGE      the image to build on (default node:24-bookworm-slim)
  --tag TAG         the tag of the new image (default vm-disk:latest)
  --stage-only DIR  stage the build context into DIR (created, or an empty folder) and
                    build nothing; prints DIR
  -h, --help        print this help
`;

/** Ends the script with a message and no stack trace. */
function fail(message, status = 1) {
  process.stderr.write(`build-image: ${message}\n`);
  process.exit(status);
}

let values;
try {
  ({ values } = parseArgs({
    options: {
      base: { type: 'string', default: 'node:24-bookworm-slim' },
      tag: { type: 'string', default: 'vm-disk:latest' },
      'stage-only': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  }));
} catch (e) {
  fail(`${e.message}\n${USAGE}`, 2);
}
if (values.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}

const app = join(import.meta.dirname, '..');
const stageOnly = values['stage-only'];
let stage;
if (stageOnly !== undefined) {
  // A folder given to us is only ever added to: it must be new or empty.
  stage = resolve(stageOnly);
  if (existsSync(stage) && readdirSync(stage).length > 0) {
    fail(`--stage-only ${stageOnly}: not an empty folder (it is never emptied for you)`, 2);
  }
} else {
  stage = mkdtempSync(join(tmpdir(), 'vm-disk-image-'));
}
mkdirSync(join(stage, 'bin'), { recursive: true });

const { build } = await import('esbuild');
// The bin (its daemon path with every package it imports: one ES module), and the
// iothreads' worker beside it where the CLI looks for it.
for (const [entry, out] of [
  ['src/cli.ts', 'lib/vm-disk.mjs'],
  ['src/iothreads/worker.ts', 'lib/iothreads/worker.js'],
]) {
  await build({
    entryPoints: [join(app, entry)],
    outfile: join(stage, out),
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
}
// The other commands' script, as the build made it, where the bin looks for it.
cpSync(join(app, 'dist/vm-disk.cjs'), join(stage, 'lib/vm-disk.cjs'));
// worker.js is an ES module: say so for its folder, as the app's package.json does for dist.
writeFileSync(join(stage, 'lib/iothreads/package.json'), '{ "type": "module" }\n');

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
  // The bin's node flag (src/cli.ts).
  '#!/bin/sh\nexec node --max-semi-space-size=1 /opt/vm-disk/lib/vm-disk.mjs "$@"\n',
);
chmodSync(join(stage, 'bin/vm-disk'), 0o755);
cpSync(join(app, 'Dockerfile'), join(stage, 'Dockerfile'));

if (stageOnly !== undefined) {
  console.log(stage);
} else {
  try {
    execFileSync(
      'docker',
      ['build', '-q', '--build-arg', `BASE=${values.base}`, '-t', values.tag, stage],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
  } catch (e) {
    process.stderr.write(e.stderr ?? '');
    fail(`docker build failed${e.status ? ` (exit status ${e.status})` : `: ${e.message}`}`);
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
  console.log(values.tag);
}
