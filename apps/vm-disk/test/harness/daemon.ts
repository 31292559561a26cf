// Runs the built `vm-disk` bin as a child process for end-to-end tests, and the other
// command-line peers (qemu-io, qemu-img, nbdinfo, qemu-storage-daemon).
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterEach, beforeEach } from 'vitest';

export const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url));
const exec = promisify(execFile);

/** Runs a command; resolves with its output, rejects with its stderr when it fails. */
export async function run(command: string, args: string[], timeout = 60_000): Promise<string> {
  try {
    const { stdout } = await exec(command, args, { timeout, maxBuffer: 64 << 20 });
    return stdout;
  } catch (e) {
    const err = e as { stderr?: string; stdout?: string; message: string };
    throw new Error(
      `${command} ${args.join(' ')} failed: ${err.stderr || err.stdout || err.message}`,
    );
  }
}

export async function waitFor(
  what: string,
  ready: () => boolean,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface RunningProcess {
  child: ChildProcess;
  /** Everything written to stderr so far (vm-disk's JSON logs). */
  stderr(): string;
  /** Resolves with the exit code (or the signal's name). */
  exited: Promise<number | string>;
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

export function start(
  command: string,
  args: string[],
  env: NodeJS.ProcessEnv = {},
): RunningProcess {
  const child = spawn(command, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, VMDISK_LOG_FORMAT: 'json', ...env },
  });
  let err = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    err += d;
  });
  child.stdout?.resume();
  const exited = new Promise<number | string>((resolve) => {
    child.on('exit', (code, signal) => resolve(code ?? signal ?? -1));
  });
  return {
    child,
    stderr: () => err,
    exited,
    stop: (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/** The options of a QMP monitor on the unix socket `qmp` (as qemu-storage-daemon takes them). */
export function monitorArgs(qmp: string): string[] {
  return ['--chardev', `socket,id=m0,path=${qmp},server=on,wait=off`, '--monitor', 'chardev=m0'];
}

/** Starts `vm-disk serve ARGS` and waits until it says it is serving. */
export async function startServe(args: string[]): Promise<RunningProcess> {
  const p = start(process.execPath, [CLI, 'serve', ...args]);
  let exitedEarly = false;
  void p.exited.then(() => {
    exitedEarly = true;
  });
  await waitFor(
    'vm-disk serve to be ready',
    () => exitedEarly || p.stderr().includes('"event":"ready"'),
  );
  if (exitedEarly) throw new Error(`vm-disk serve exited early:\n${p.stderr()}`);
  return p;
}

/** Starts qemu-storage-daemon ARGS and waits for a socket file it creates. */
export async function startQsd(args: string[], socket: string): Promise<RunningProcess> {
  const p = start('qemu-storage-daemon', args);
  await waitFor('qemu-storage-daemon', () => existsSync(socket) || p.child.exitCode !== null);
  if (p.child.exitCode !== null) throw new Error(`qemu-storage-daemon exited: ${p.stderr()}`);
  return p;
}

/**
 * Scratch for the tests of one file that run daemons: before each test a fresh temporary
 * directory; after it, every process in `running` killed (SIGKILL) and the directory removed.
 * Call once at the top level of a test file.
 */
export function useScratch(prefix: string): {
  /** The test's directory. */
  readonly dir: string;
  /** A path in the test's directory. */
  path(name: string): string;
  /** Processes to kill after the test. */
  readonly running: RunningProcess[];
  /** `vm-disk serve ARGS`, ready, killed after the test. */
  serve(args: string[]): Promise<RunningProcess>;
} {
  let dir = '';
  const running: RunningProcess[] = [];
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), prefix));
  });
  afterEach(async () => {
    await Promise.all(running.splice(0).map((p) => p.stop('SIGKILL')));
    rmSync(dir, { recursive: true, force: true });
  });
  return {
    get dir() {
      return dir;
    },
    path: (name) => join(dir, name),
    running,
    serve: async (args) => {
      const p = await startServe(args);
      running.push(p);
      return p;
    },
  };
}
