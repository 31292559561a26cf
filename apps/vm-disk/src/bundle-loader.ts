// How the bin starts: the CLI and every package it uses are one CommonJS script,
// dist/vm-disk.cjs (tsup.config.ts), compiled through a V8 code cache of our own.
//
// Node's compile cache (module.enableCompileCache) is made when a module is compiled, before
// it runs: it holds the top-level code, and every function the run calls is compiled again
// on each start. A code cache made after the run (vm.Script#createCachedData) holds those
// functions too. With one script instead of seventeen ES modules, `vm-disk info` of a small
// image went 71-76 -> 61-69 ms (alternated runs; node alone 25-27 ms, qemu-img info 4-7).
//
// The cache is one file per subcommand (each run compiles that command's functions), named
// by the script's CRC-32 and length, Node's version and architecture and the process's
// flags, in a folder of the user's own (mode 0700) under os.tmpdir(). It is written when
// the run succeeded and had no usable cache, and replaces the files of older builds. V8
// refuses a cache made by another V8 or other flags (cachedDataRejected); the run then
// compiles as usual and writes a new one. VMDISK_CODE_CACHE=off (or Node's
// NODE_DISABLE_COMPILE_CACHE) turns it off; VMDISK_CODE_CACHE=DIR puts it elsewhere.
// Every failure of the cache is silent: it only ever costs the compile it would have saved.
import {
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import vm from 'node:vm';
import { crc32 } from 'node:zlib';

export type Main = (argv: readonly string[]) => Promise<number>;

/** The cache's folder, made and checked (ours, no one else may write it); else undefined. */
function cacheDir(): string | undefined {
  const env = process.env.VMDISK_CODE_CACHE;
  if (env === 'off' || process.env.NODE_DISABLE_COMPILE_CACHE) return undefined;
  const uid = process.getuid?.() ?? 0;
  const dir = env || join(tmpdir(), `vm-disk-code-cache-${uid}`);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const st = lstatSync(dir);
    return st.isDirectory() && st.uid === uid && (st.mode & 0o022) === 0 ? dir : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Writes the cache file `build-rest` (atomically) and removes those of other builds with
 * the same rest (Node, flags, command).
 */
function save(dir: string, build: string, rest: string, script: vm.Script): void {
  const name = `${build}-${rest}`;
  const tmp = join(dir, `${name}.${process.pid}.tmp`);
  try {
    writeFileSync(tmp, script.createCachedData(), { mode: 0o600 });
    renameSync(tmp, join(dir, name));
    for (const f of readdirSync(dir)) {
      if (f !== name && f.endsWith(`-${rest}`)) rmSync(join(dir, f), { force: true });
    }
  } catch {
    // A cache not written is a compile not saved next time; no part of one is left.
    try {
      rmSync(tmp, { force: true });
    } catch {
      // Nothing more to do at exit.
    }
  }
}

/** Loads the bundle at `file` and returns its `main`, for the command line `argv`. */
export function loadBundle(file: string, argv: readonly string[]): Main {
  const bytes = readFileSync(file);
  const dir = cacheDir();
  const command = /^[a-z][a-z-]{0,31}$/.test(argv[0] ?? '') ? argv[0]! : 'none';
  const flags = crc32(process.execArgv.join('\0')).toString(16);
  const build = `${crc32(bytes).toString(16)}-${bytes.length}`;
  const rest = `${process.version}-${process.arch}-${flags}-${command}.bin`;
  const name = `${build}-${rest}`;
  let cachedData: Buffer | undefined;
  if (dir !== undefined) {
    try {
      cachedData = readFileSync(join(dir, name));
    } catch {
      // None yet.
    }
  }
  // Node's CommonJS wrapper, on the script's first line so that line numbers stay.
  const script = new vm.Script(
    `(function (exports, require, module, __filename, __dirname) {${bytes.toString('utf8')}\n})`,
    {
      filename: file,
      ...(cachedData === undefined ? {} : { cachedData }),
      importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
    },
  );
  const module = { exports: {} as { main?: Main } };
  script.runInThisContext()(module.exports, createRequire(file), module, file, dirname(file));
  if (dir !== undefined && (cachedData === undefined || script.cachedDataRejected)) {
    process.once('exit', (code) => {
      if (code === 0) save(dir, build, rest, script);
    });
  }
  const main = module.exports.main;
  if (typeof main !== 'function') throw new Error(`${file}: no main function`);
  return main;
}
