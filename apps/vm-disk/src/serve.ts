// `vm-disk serve [qemu-storage-daemon options]`: runs the daemon until `quit`, SIGINT or
// SIGTERM, then stops cleanly.
import { setMallocMmapThreshold } from '@vmdisk/engine';
import { Daemon } from './daemon.ts';
import { createLogger, type Logger } from './log.ts';
import { parseServeOptions } from './options/serve-options.ts';

export async function serve(
  argv: readonly string[],
  log: Logger = createLogger(),
): Promise<number> {
  const config = parseServeOptions(argv);
  // Buffers freed after a burst of large requests go back to the system (see there).
  setMallocMmapThreshold();
  return serveUntilStopped(await Daemon.start(config, log), log);
}

/** Runs a started daemon until `quit`, SIGINT or SIGTERM; resolves to the exit status. */
export async function serveUntilStopped(daemon: Daemon, log: Logger): Promise<number> {
  const onSignal = (signal: NodeJS.Signals) => {
    log.info({ event: 'signal', signal }, `received ${signal}`);
    void daemon.stop();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  log.info({ event: 'ready', nbd: daemon.nbdAddress }, 'vm-disk is serving');
  await daemon.wait();
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  return 0;
}
