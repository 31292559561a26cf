// No stale mount after the daemon dies, however it dies. A clean stop unmounts each export
// itself; but after kill -9 (or a crash) the kernel only aborts the FUSE connection and the
// mount stays, failing every access with ENOTCONN until someone unmounts it. So the first
// mount starts a watchdog: a tiny child process (node, in its own process group so that a
// terminal's ^C does not reach it, ignoring SIGINT/SIGTERM/SIGHUP) whose stdin is a pipe
// from the daemon. The daemon tells it each mount point it mounts and unmounts; when the
// pipe reaches EOF (the daemon is gone, for whatever reason) it detaches what is left
// (umount2 MNT_DETACH, as libfuse does) and exits. Cleaning up at the next start instead
// would leave the stale mount there until then, and would have to guess which dead
// connections are ours.
import { type ChildProcess, spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const SCRIPT = `
const koffi = (await import(process.argv[1])).default;
const umount2 = koffi.load('libc.so.6').func('int umount2(const char *target, int flags)');
for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(s, () => {});
const mounts = new Map();
let pending = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  pending += d;
  for (let i; (i = pending.indexOf('\\n')) >= 0; ) {
    const m = JSON.parse(pending.slice(0, i));
    pending = pending.slice(i + 1);
    const n = (mounts.get(m.path) ?? 0) + (m.op === 'mount' ? 1 : -1);
    if (n > 0) mounts.set(m.path, n); else mounts.delete(m.path);
  }
});
process.stdin.on('end', () => {
  for (const [path, n] of mounts) for (let i = 0; i < n; i++) umount2(path, 2);
  process.exit(0);
});
`;

let child: ChildProcess | undefined;

function watchdog(): ChildProcess {
  if (child?.stdin && !child.stdin.destroyed) return child;
  const c = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      SCRIPT,
      pathToFileURL(createRequire(import.meta.url).resolve('koffi')).href,
    ],
    { detached: true, stdio: ['pipe', 'ignore', 'inherit'] },
  );
  c.unref();
  // The pipe must not keep the daemon alive; the child sees EOF when the daemon exits.
  (c.stdin as unknown as { unref?: () => void }).unref?.();
  c.stdin?.on('error', () => {});
  c.on('error', () => {});
  child = c;
  return c;
}

/** The watchdog's process id (tests kill the daemon and watch the mount go). */
export function watchdogPid(): number | undefined {
  return child?.pid;
}

/** Tells the watchdog a mount point was mounted (`mount`) or unmounted by us (`umount`). */
export function tellWatchdog(op: 'mount' | 'umount', path: string): void {
  watchdog().stdin?.write(`${JSON.stringify({ op, path })}\n`);
}
