// The daemon's structured logs (src/log.ts): pino's JSON lines (the fields and numbers that
// pino wrote before it was replaced, so that pino-pretty and log readers go on reading
// them), levels, child loggers, errors; lines written to stderr are out before the process
// exits, even on a pipe nobody reads until then.
import { spawn } from 'node:child_process';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.ts';

const format = process.env.VMDISK_LOG_FORMAT;
afterEach(() => {
  if (format === undefined) delete process.env.VMDISK_LOG_FORMAT;
  else process.env.VMDISK_LOG_FORMAT = format;
});

/** A logger writing JSON lines to memory, and the lines parsed. */
function capture(level = 'info') {
  process.env.VMDISK_LOG_FORMAT = 'json';
  const stream = new PassThrough();
  let text = '';
  stream.on('data', (d: Buffer) => {
    text += d.toString();
  });
  const log = createLogger({ stream, level });
  const lines = () =>
    text
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  return { log, lines, text: () => text };
}

describe('log lines', () => {
  it("are pino's: level number, time, name, bindings, fields, msg, in that order", () => {
    const { log, lines, text } = capture();
    const before = Date.now();
    log.child({ component: 'qmp' }).info({ event: 'ready', port: 10809 }, 'serving');
    const [line] = lines();
    expect(Object.keys(line!)).toEqual([
      'level',
      'time',
      'name',
      'component',
      'event',
      'port',
      'msg',
    ]);
    expect(line).toMatchObject({ level: 30, name: 'vm-disk', component: 'qmp', msg: 'serving' });
    expect(line!.time).toBeGreaterThanOrEqual(before);
    expect(line!.time).toBeLessThanOrEqual(Date.now());
    expect(text().endsWith('}\n')).toBe(true);
  });

  it('level numbers as pino: trace 10 ... fatal 60; below the level nothing is written', () => {
    const { log, lines } = capture('trace');
    log.trace('t');
    log.debug('d');
    log.info('i');
    log.warn('w');
    log.error('e');
    log.fatal('f');
    expect(lines().map((l) => [l.level, l.msg])).toEqual([
      [10, 't'],
      [20, 'd'],
      [30, 'i'],
      [40, 'w'],
      [50, 'e'],
      [60, 'f'],
    ]);
    const warn = capture('warn');
    warn.log.info({ event: 'x' }, 'not written');
    warn.log.debug('not written');
    warn.log.warn('written');
    expect(warn.lines().map((l) => l.msg)).toEqual(['written']);
    expect(warn.log.level).toBe('warn');
    expect(warn.log.isLevelEnabled('info')).toBe(false);
    expect(warn.log.isLevelEnabled('error')).toBe(true);
  });

  it('the level can be changed, for the logger and its children; silent writes nothing', () => {
    const { log, lines } = capture('info');
    const child = log.child({ component: 'nbd' });
    log.level = 'debug';
    child.debug('now written');
    log.level = 'silent';
    child.fatal('not written');
    expect(lines().map((l) => l.msg)).toEqual(['now written']);
    expect(() => createLogger({ stream: new PassThrough(), level: 'loud' })).toThrow(/loud/);
  });

  it('an err field is type, message, stack and its own fields (code); an Error alone too', () => {
    const { log, lines } = capture();
    const err = Object.assign(new RangeError('out of range'), { code: 'ERR_X', errno: -22 });
    log.error({ event: 'close-failed', err }, 'closing failed');
    log.warn(new Error('bare'));
    const [a, b] = lines();
    expect(a!.err).toEqual({
      type: 'RangeError',
      message: 'out of range',
      stack: err.stack,
      code: 'ERR_X',
      errno: -22,
    });
    expect(a!.msg).toBe('closing failed');
    expect(b).toMatchObject({ level: 40, msg: 'bare', err: { type: 'Error', message: 'bare' } });
  });

  it('child bindings nest; printf arguments format the message; cycles and bigints do not throw', () => {
    const { log, lines } = capture();
    log.child({ a: 1 }).child({ b: 2 }).info('%s has %d', 'disk', 3);
    const cycle: Record<string, unknown> = { n: 10n };
    cycle.self = cycle;
    log.info({ cycle }, 'odd fields');
    const [a, b] = lines();
    expect(a).toMatchObject({ a: 1, b: 2, msg: 'disk has 3' });
    expect(b!.cycle).toEqual({ n: '10', self: '[Circular]' });
  });

  it('pino-pretty reads them: VMDISK_LOG_FORMAT=pretty gives readable lines', async () => {
    process.env.VMDISK_LOG_FORMAT = 'pretty';
    const stream = new PassThrough();
    let text = '';
    stream.on('data', (d: Buffer) => {
      text += d.toString();
    });
    const log = createLogger({ stream });
    log.warn({ event: 'nbd-connect', client: 'c1' }, 'NBD client connected');
    await new Promise((r) => setTimeout(r, 50));
    // Colours stripped: "[time] WARN: NBD client connected" and the fields below it.
    // biome-ignore lint/suspicious/noControlCharactersInRegex: ANSI colour codes
    const plain = text.replace(/\x1b\[[0-9;]*m/g, '');
    expect(plain).toMatch(/WARN: NBD client connected/);
    expect(plain).toMatch(/event: "nbd-connect"/);
    expect(plain).not.toContain('{"level"');
  });
});

describe('log lines on stderr', () => {
  it('are all out when the process exits at once, on a pipe read only afterwards', async () => {
    // 4000 lines of about 1 KiB: far more than a pipe holds (64 KiB). The child exits with
    // process.exit() right after logging; lines still queued in a stream would be lost.
    const logModule = fileURLToPath(new URL('../src/log.ts', import.meta.url));
    const script = `
      import { createLogger } from ${JSON.stringify(logModule)};
      const log = createLogger();
      for (let i = 0; i < 4000; i++) log.info({ event: 'n', i, pad: 'x'.repeat(1000) }, 'line');
      process.exit(0);
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, VMDISK_LOG_FORMAT: 'json' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    // Not read until the child has written everything it could (it blocks on the full pipe).
    child.stderr.pause();
    await new Promise((r) => setTimeout(r, 300));
    let text = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      text += d;
    });
    child.stderr.resume();
    const code = await new Promise<number | null>((r) => child.on('close', r));
    expect(code).toBe(0);
    const lines = text.split('\n').filter((l) => l !== '');
    expect(lines).toHaveLength(4000);
    expect(JSON.parse(lines[3999]!)).toMatchObject({ event: 'n', i: 3999, msg: 'line' });
  });
});
