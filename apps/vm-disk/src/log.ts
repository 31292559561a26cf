// Structured logs (pino): JSON lines for machines, readable lines on a terminal.
// VMDISK_LOG_LEVEL sets the level (default info); VMDISK_LOG_FORMAT=json|pretty overrides
// the terminal detection.
import { createRequire } from 'node:module';
import { type Logger, pino } from 'pino';
import type PinoPretty from 'pino-pretty';

export type { Logger };

export function createLogger(
  options: { stream?: NodeJS.WritableStream; level?: string } = {},
): Logger {
  const stream = options.stream ?? process.stderr;
  const level = options.level ?? process.env.VMDISK_LOG_LEVEL ?? 'info';
  const format =
    process.env.VMDISK_LOG_FORMAT ?? ((stream as { isTTY?: boolean }).isTTY ? 'pretty' : 'json');
  const base = { name: 'vm-disk' };
  if (format === 'pretty') {
    // Loaded on a terminal only: a daemon logging JSON does not pay its memory (issue 18).
    const pretty = createRequire(import.meta.url)('pino-pretty') as typeof PinoPretty;
    return pino(
      { level, base },
      pretty({ destination: stream, colorize: true, ignore: 'pid,hostname,name' }),
    );
  }
  return pino({ level, base }, stream);
}
