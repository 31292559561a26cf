// Structured logs: JSON lines for machines, readable lines on a terminal.
// VMDISK_LOG_LEVEL sets the level (default info); VMDISK_LOG_FORMAT=json|pretty overrides
// the terminal detection.
//
// The lines are pino's (the logger this replaced): numeric `level`, `time` in ms since the
// epoch, `name`, a child's bindings, the call's fields, `msg`; an `err` field is written
// as {type, message, stack, ...its own fields such as code}. Tools that read pino's lines
// (pino-pretty, which shows them on a terminal) read these. Our own logger because pino
// and what it loads (sonic-boom, thread-stream and worker_threads, node:assert, ...) were
// about 6 MB of an idle daemon's 60 MB resident memory (issue 18); what the daemon uses of
// it (levels, child loggers, fields and a message) fits in this file.
//
// Writes are synchronous when the destination is the process's stderr (fd 2): a line is
// out before the call returns, so nothing is lost when the process exits or crashes. A
// daemon logs a few lines per connection or command, not per request, so the cost of a
// write(2) per line does not show. Any other stream (a test's, pino-pretty's) is written
// with stream.write, one whole line per call.
import { writeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isatty } from 'node:tty';
import { format } from 'node:util';
import type PinoPretty from 'pino-pretty';

/** pino's level names and numbers. */
const LEVELS = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 } as const;

export type LevelName = keyof typeof LEVELS;

type LogFn = {
  (fields: object, msg?: string, ...args: unknown[]): void;
  (msg: string, ...args: unknown[]): void;
};

export interface Logger extends Record<LevelName, LogFn> {
  /** The threshold: 'trace' ... 'fatal', or 'silent' for nothing. */
  level: LevelName | 'silent';
  isLevelEnabled(level: LevelName): boolean;
  /** A logger whose lines carry `bindings` too (before each call's own fields). */
  child(bindings: Record<string, unknown>): Logger;
}

function threshold(level: string): number {
  if (level === 'silent') return Number.POSITIVE_INFINITY;
  const n = LEVELS[level as LevelName];
  if (n === undefined) throw new Error(`unknown log level '${level}'`);
  return n;
}

/** An error as pino's std serializer writes it: type, message, stack, its own fields. */
function serializeError(err: Error): Record<string, unknown> {
  const out: Record<string, unknown> = {
    type: err.constructor?.name ?? 'Error',
    message: err.message,
    stack: err.stack,
  };
  for (const key of Object.keys(err)) {
    const v = (err as unknown as Record<string, unknown>)[key];
    out[key] = v instanceof Error ? serializeError(v) : v;
  }
  if (err.cause instanceof Error && !('cause' in out)) out.cause = serializeError(err.cause);
  return out;
}

/** JSON.stringify that does not throw: bigints as numbers' digits, cycles as "[Circular]". */
function stringify(record: Record<string, unknown>): string {
  try {
    return JSON.stringify(record);
  } catch {
    const seen = new WeakSet<object>();
    return JSON.stringify(record, (_key, v: unknown) => {
      if (typeof v === 'bigint') return v.toString();
      if (typeof v === 'object' && v !== null) {
        if (seen.has(v)) return '[Circular]';
        seen.add(v);
      }
      return v;
    });
  }
}

/** What writeStderr waits on for 1 ms while a full pipe drains (never woken). */
const pause = new Int32Array(new SharedArrayBuffer(4));

/** Writes whole lines to fd 2, waiting out a full non-blocking pipe (EAGAIN). */
function writeStderr(line: string): void {
  let buf = Buffer.from(line);
  for (;;) {
    try {
      const n = writeSync(2, buf);
      if (n === buf.length) return;
      buf = buf.subarray(n);
    } catch (e) {
      // A reader that went away (EPIPE) or a closed fd loses the log, not the daemon.
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') return;
      Atomics.wait(pause, 0, 0, 1);
    }
  }
}

interface Shared {
  threshold: number;
  level: LevelName | 'silent';
  write(line: string): void;
}

function makeLogger(shared: Shared, bindings: Record<string, unknown>): Logger {
  const method =
    (name: LevelName): LogFn =>
    (first: unknown, msg?: unknown, ...args: unknown[]): void => {
      const n = LEVELS[name];
      if (n < shared.threshold) return;
      const record: Record<string, unknown> = { level: n, time: Date.now(), ...bindings };
      let text = msg;
      let rest = args;
      if (typeof first === 'string') {
        text = first;
        rest = msg === undefined ? [] : [msg, ...args];
      } else if (first instanceof Error) {
        record.err = serializeError(first);
        if (text === undefined) text = first.message;
      } else if (typeof first === 'object' && first !== null) {
        for (const [k, v] of Object.entries(first)) {
          record[k] = k === 'err' && v instanceof Error ? serializeError(v) : v;
        }
      }
      if (text !== undefined) record.msg = rest.length > 0 ? format(text, ...rest) : text;
      shared.write(`${stringify(record)}\n`);
    };
  const logger = {
    get level() {
      return shared.level;
    },
    set level(level: LevelName | 'silent') {
      shared.threshold = threshold(level);
      shared.level = level;
    },
    isLevelEnabled: (level: LevelName) => LEVELS[level] >= shared.threshold,
    child: (more: Record<string, unknown>) => makeLogger(shared, { ...bindings, ...more }),
  } as Logger;
  for (const name of Object.keys(LEVELS) as LevelName[]) logger[name] = method(name);
  return logger;
}

export function createLogger(
  options: { stream?: NodeJS.WritableStream; level?: string } = {},
): Logger {
  const level = (options.level ?? process.env.VMDISK_LOG_LEVEL ?? 'info') as LevelName;
  // Without a stream, fd 2 is asked directly: process.stderr is not created (a pipe's is a
  // net.Socket) unless pino-pretty writes to it.
  const tty = options.stream ? (options.stream as { isTTY?: boolean }).isTTY : isatty(2);
  const wanted = process.env.VMDISK_LOG_FORMAT ?? (tty ? 'pretty' : 'json');
  let write: (line: string) => void;
  if (wanted === 'pretty') {
    // Loaded on a terminal only: a daemon logging JSON does not pay its memory (issue 18).
    // pino-pretty reads our JSON lines and writes readable ones to the terminal.
    const pretty = createRequire(import.meta.url)('pino-pretty') as typeof PinoPretty;
    const stream = pretty({
      destination: options.stream ?? process.stderr,
      colorize: true,
      ignore: 'pid,hostname,name',
    });
    write = (line) => stream.write(line);
  } else if (options.stream === undefined || options.stream === process.stderr) {
    write = writeStderr;
  } else {
    const stream = options.stream;
    write = (line) => stream.write(line);
  }
  return makeLogger({ threshold: threshold(level), level, write }, { name: 'vm-disk' });
}
