// The vhost-user-blk servers the real-guest tests and the benchmark compare: each started
// with the same qemu-storage-daemon command line (`--blockdev` file + format node,
// `--export type=vhost-user-blk,...`). Plain Node (no vitest) so that bench/ can use it.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

// The bin itself (its shebang's node flags apply, as for users and the NBD benches).
const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

export interface VhostExport {
  /** The image file and its format (raw or qcow2). */
  image: string;
  format: string;
  /** The vhost-user-blk unix socket the server listens on. */
  socket: string;
  numQueues?: number;
  /** Runs the server as `taskset -c CPU ...`. */
  cpu?: number;
}

/** qemu-storage-daemon's options for a writable vhost-user-blk export of `image`. */
export function vhostExportArgs(e: VhostExport): string[] {
  return [
    '--blockdev',
    `driver=file,node-name=file0,filename=${e.image},discard=unmap`,
    '--blockdev',
    `driver=${e.format},node-name=disk0,file=file0,discard=unmap`,
    '--export',
    `type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path=${e.socket},writable=on,num-queues=${e.numQueues ?? 1}`,
  ];
}

export interface VhostDaemon {
  child: ChildProcess;
  pid: number;
  stderr(): string;
  /** SIGTERM, and resolves when it has exited. */
  stop(): Promise<void>;
}

export interface VhostServer {
  name: string;
  start(e: VhostExport): Promise<VhostDaemon>;
}

/** Spawns `command args` and waits until `socket` exists; rejects with stderr if it exits. */
async function startDaemon(
  command: string,
  args: string[],
  e: VhostExport,
  env: NodeJS.ProcessEnv = {},
): Promise<VhostDaemon> {
  const [cmd, argv] =
    e.cpu === undefined ? [command, args] : ['taskset', ['-c', String(e.cpu), command, ...args]];
  const child = spawn(cmd, argv, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ...env },
  });
  let err = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    err += d;
  });
  const exited = new Promise<void>((resolve) => {
    child.on('exit', () => resolve());
  });
  const deadline = Date.now() + 30_000;
  while (!existsSync(e.socket)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${command} exited (${child.exitCode ?? child.signalCode}): ${err}`);
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${command} did not create ${e.socket} within 30 s: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    child,
    pid: child.pid as number,
    stderr: () => err,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

export const QSD: VhostServer = {
  name: 'qemu-storage-daemon',
  start: (e) => startDaemon('qemu-storage-daemon', vhostExportArgs(e), e),
};

/** `vm-disk serve` (the built bin) with the same options as qemu-storage-daemon. */
export const VM_DISK: VhostServer = {
  name: 'vm-disk',
  start: (e) =>
    startDaemon(CLI, ['serve', ...vhostExportArgs(e)], e, {
      VMDISK_LOG_LEVEL: 'warn',
    }),
};
