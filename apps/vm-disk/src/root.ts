// The composition root of `vm-disk serve`: a daemon, and its QMP monitor's commands wired
// to it (as the DaemonControl it implements), then configured from checked options; the
// metrics endpoint (--metrics) reads the daemon until it stops.
import { Daemon } from './daemon.ts';
import type { Logger } from './log.ts';
import type { ServeConfig } from './options/serve-options.ts';
import { registerCommands } from './qmp/commands.ts';

/** Starts a daemon from checked options; on any failure, undoes what was done and throws. */
export async function startDaemon(config: ServeConfig, log: Logger): Promise<Daemon> {
  const daemon = new Daemon(log);
  registerCommands(daemon.monitor, daemon);
  await daemon.start(config);
  if (config.metrics) {
    // Loaded only when asked for: prom-client and node:http cost idle memory (issue 18).
    const { startMetricsServer } = await import('./metrics/server.ts');
    const metrics = await startMetricsServer(daemon, config.metrics.addr, log).catch(
      async (err: unknown) => {
        await daemon.stop();
        throw err;
      },
    );
    void daemon.wait().then(() => metrics.close());
  }
  return daemon;
}
