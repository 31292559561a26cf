// Listening on a unix socket that nobody can reach before it has its mode: the socket is
// bound inside a private (0700) directory beside its path, given its mode, then renamed
// into place. A stale socket at the path is replaced (as QEMU does); any other file there
// is left alone and the listen fails with EADDRINUSE.
import { chmod, lstat, mkdtemp, rename, rm } from 'node:fs/promises';
import type * as net from 'node:net';
import { basename, dirname, join } from 'node:path';

function addressInUse(path: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(
    `listen EADDRINUSE: ${path} exists and is not a socket`,
  );
  err.code = 'EADDRINUSE';
  err.errno = -98;
  err.syscall = 'listen';
  return err;
}

/** Makes `server` listen on the unix socket `path` with permissions `mode` (default 0600). */
export async function listenUnixSocket(
  server: net.Server,
  path: string,
  mode = 0o600,
): Promise<void> {
  const existing = await lstat(path).catch(() => undefined);
  if (existing && !existing.isSocket()) throw addressInUse(path);
  const privateDir = await mkdtemp(join(dirname(path), `.${basename(path)}-`));
  const bound = join(privateDir, 'socket');
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(bound, () => {
        server.off('error', reject);
        resolve();
      });
    });
    await chmod(bound, mode);
    await rename(bound, path);
  } finally {
    await rm(privateDir, { recursive: true, force: true });
  }
}
