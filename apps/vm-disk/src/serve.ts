// `vm-disk serve [qemu-storage-daemon options]`: runs the daemon until `quit`, SIGINT or
// SIGTERM, then stops cleanly.
import { setMallocMmapThreshold } from '@vmdisk/engine';
import type { Daemon } from './daemon.ts';
import { createLogger, type Logger } from './log.ts';
import { parseServeOptions } from './options/serve-options.ts';
import { startDaemon } from './root.ts';

export async function serve(
  argv: readonly string[],
  log: Logger = createLogger(),
): Promise<number> {
  const config = parseServeOptions(argv);
  // Buffers freed after a burst of large requests go back to the system (see there).
  setMallocMmapThreshold();
  return serveUntilStopped(await startDaemon(config, log), log);
}

/** Runs a started daemon until `quit`, SIGINT or SIGTERM; resolves to the exit status. */
export async function serveUntilStopped(daemon: Daemon, log: Logger): Promise<number> {
  const onSignal = (signal: NodeJS.Signals) => {
    log.info({ event: 'signal', signal }, `received ${signal}`);
    void daemon.stop();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // Like qemu-storage-daemon, a daemon with nothing to serve yet keeps running (a monitor
  // may add everything later) until a signal or quit: signal handlers alone do not keep
  // Node's event loop alive, so a timer does.
  const keepAlive = setInterval(() => {}, 2 ** 30);
  log.info({ event: 'ready', nbd: daemon.nbdAddress }, 'vm-disk is serving');
  try {
    await daemon.wait();
  } finally {
    clearInterval(keepAlive);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return 0;
}
