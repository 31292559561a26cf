// A QMP-compatible monitor (QEMU's docs/interop/qmp-spec): greeting, capabilities
// negotiation, commands with `execute`/`arguments`/`id`, errors with QEMU's error classes
// and events with timestamps, over unix sockets. Wire-compatible with QEMU's, so that a
// QMP client written for qemu-storage-daemon drives vm-disk unchanged. Commands of one
// connection run one at a time, in order, as QEMU runs them (no out-of-band execution).
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { BlockOptionError, schema, type Type, type TypeInfo } from '@vmdisk/block-graph';
import { listenUnixSocket } from '@vmdisk/nbd';
import { type IntrospectedEvent, introspect } from './introspect.ts';
import { JsonStreamSplitter } from './json-stream.ts';

export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

/** An error a command handler throws to answer with a given QMP error class. */
export class QmpError extends Error {
  override name = 'QmpError';
  readonly code = 'ERR_VMDISK_APP_QMP';
  constructor(
    readonly errorClass: QmpErrorClass,
    message: string,
  ) {
    super(message);
  }
}

export interface QmpSession {
  /** The connection number, for logs. */
  readonly id: number;
  /** Past capabilities negotiation. */
  readonly negotiated: boolean;
}

/**
 * A command: its arguments' schema (@vmdisk/block-graph's; QMP's arguments are typed JSON,
 * never converted as the command line's keyval strings are), and what runs it with them
 * checked and typed; what it returns is the `return` value.
 */
export interface QmpCommand<A> {
  name: string;
  args: Type<A>;
  /** What it returns, for query-qmp-schema (absent: any value). */
  returns?: Type<unknown>;
  run(args: A, session: QmpSession): unknown | Promise<unknown>;
}

/** A command without arguments. */
export interface QmpCommandNoArgs {
  name: string;
  returns?: Type<unknown>;
  run(args: Record<string, never>, session: QmpSession): unknown | Promise<unknown>;
}

/** A registered command: checks its arguments, then runs. */
interface Registered {
  run(args: Record<string, unknown>, session: QmpSession): unknown;
  args?: TypeInfo;
  returns?: TypeInfo;
}

const noArgs = schema.struct({});

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface QmpLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

type Reply = Record<string, unknown>;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Commands of one connection waiting to run before it stops being read. */
const MAX_PENDING = 64;

/** How long a closing connection may take to flush what it was sent. */
const CLOSE_GRACE_MS = 2000;

class Connection implements QmpSession {
  negotiated = false;
  /** The client enabled the oob capability (qmp_capabilities). */
  oob = false;
  private queue: Promise<void> = Promise.resolve();
  private pending = 0;
  private readonly splitter = new JsonStreamSplitter();

  constructor(
    readonly id: number,
    private readonly socket: net.Socket,
    private readonly monitor: QmpMonitor,
    private readonly pretty: boolean,
  ) {
    // Bytes, not strings: the splitter decodes only complete texts within its size limit.
    socket.on('data', (chunk: Buffer) => {
      for (const item of this.splitter.push(chunk)) {
        this.pending++;
        this.queue = this.queue
          .then(() =>
            'error' in item
              ? this.send({ error: { class: 'GenericError', desc: item.error } })
              : this.handle(item.text),
          )
          .finally(() => {
            this.pending--;
            this.flowControl();
          });
      }
      this.flowControl();
    });
    socket.on('drain', () => this.flowControl());
  }

  /**
   * Bounded memory: a client that sends commands faster than they run, or does not read
   * its replies, stops being read until it catches up (TCP backpressure does the rest).
   */
  private flowControl(): void {
    const busy = this.pending >= MAX_PENDING || this.socket.writableNeedDrain;
    if (busy) this.socket.pause();
    else if (this.socket.isPaused()) this.socket.resume();
  }

  send(message: Reply): void {
    if (this.socket.writable) {
      this.socket.write(
        `${this.pretty ? JSON.stringify(message, null, 4) : JSON.stringify(message)}\r\n`,
      );
    }
  }

  /**
   * Ends the connection: what was sent is flushed, then the socket is destroyed without
   * waiting for the client to hang up (a management tool may keep its monitor open for
   * ever). A client that does not read gets a grace period to take what was sent.
   */
  close(): Promise<void> {
    const socket = this.socket;
    if (socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      const grace = setTimeout(() => socket.destroy(), CLOSE_GRACE_MS);
      socket.once('close', () => {
        clearTimeout(grace);
        resolve();
      });
      socket.end(() => socket.destroy());
    });
  }

  private async handle(text: string): Promise<void> {
    let request: unknown;
    try {
      request = JSON.parse(text);
    } catch (e) {
      this.send({
        error: { class: 'GenericError', desc: `JSON parse error, ${(e as Error).message}` },
      });
      return;
    }
    const reply = await this.monitor.dispatch(this, request);
    if (reply) this.send(reply);
  }
}

export class QmpMonitor extends EventEmitter {
  private readonly commands = new Map<string, Registered>();
  private readonly events = new Map<string, IntrospectedEvent>();
  private readonly connections = new Set<Connection>();
  private readonly servers: net.Server[] = [];
  private nextId = 1;

  constructor(
    private readonly version: QmpVersion,
    private readonly log?: QmpLogger,
  ) {
    super();
    this.register({
      name: 'qmp_capabilities',
      args: schema.struct({ enable: schema.opt(schema.list(schema.enumOf(['oob']))) }),
      run: (args, session) => {
        // After its arguments are checked, as QEMU does.
        if (session.negotiated) {
          throw new QmpError(
            'CommandNotFound',
            'Capabilities negotiation is already complete, command ignored',
          );
        }
        // The schema takes 'oob' only, the one capability offered.
        if (args.enable?.includes('oob')) (session as Connection).oob = true;
        return {};
      },
    });
    this.register({ name: 'query-version', run: () => this.version });
    this.register({
      name: 'query-commands',
      run: () => [...this.commands.keys()].map((name) => ({ name })),
    });
    this.register({ name: 'query-qmp-schema', run: () => this.schema() });
  }

  /** Declares an event the monitor may send, with its data's schema (for query-qmp-schema). */
  declareEvent(name: string, data?: Type<unknown>): void {
    this.events.set(name, { name, ...(data && { data: data.info }) });
  }

  /** query-qmp-schema's answer: every registered command and declared event. */
  schema(): ReturnType<typeof introspect> {
    const commands = [...this.commands].map(([name, c]) => ({
      name,
      ...(c.args && { args: c.args }),
      ...(c.returns && { returns: c.returns }),
    }));
    return introspect(commands, [...this.events.values()]);
  }

  register<A>(command: QmpCommand<A>): void;
  register(command: QmpCommandNoArgs): void;
  register<A>(command: QmpCommand<A> | QmpCommandNoArgs): void {
    const returns = command.returns && { returns: command.returns.info };
    if (!('args' in command)) {
      this.commands.set(command.name, {
        run: (given, session) => {
          noArgs.parse(given, '', 'json');
          return command.run({}, session);
        },
        ...returns,
      });
      return;
    }
    this.commands.set(command.name, {
      run: (given, session) => command.run(command.args.parse(given, '', 'json'), session),
      args: command.args.info,
      ...returns,
    });
  }

  /**
   * Broadcasts an event to every connection past capabilities negotiation. An event not
   * declared (declareEvent) is a bug of ours, logged, and sent all the same.
   */
  emitEvent(event: string, data?: Record<string, unknown>): void {
    if (!this.events.has(event)) {
      this.log?.warn({ event: 'qmp-event-undeclared', name: event }, 'undeclared QMP event');
    }
    const now = Date.now();
    const message: Reply = {
      event,
      ...(data !== undefined && { data }),
      timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 },
    };
    for (const c of this.connections) if (c.negotiated) c.send(message);
  }

  /** Listens on a unix socket (mode 0600, set before anyone can connect), replacing a stale one. */
  async listen(path: string, options: { pretty?: boolean } = {}): Promise<void> {
    const server = net.createServer((socket) => this.attach(socket, options.pretty ?? false));
    await listenUnixSocket(server, path);
    this.servers.push(server);
  }

  /** Serves one QMP connection on `socket`: sends the greeting, then answers commands. */
  attach(socket: net.Socket, pretty = false): void {
    const connection = new Connection(this.nextId++, socket, this, pretty);
    this.connections.add(connection);
    this.log?.info({ event: 'qmp-connect', session: connection.id }, 'QMP client connected');
    socket.on('close', () => {
      this.connections.delete(connection);
      this.log?.info(
        { event: 'qmp-disconnect', session: connection.id },
        'QMP client disconnected',
      );
    });
    socket.on('error', () => {});
    connection.send({ QMP: { version: this.version, capabilities: ['oob'] } });
  }

  /** Stops listening and closes every connection (resolves once they are closed). */
  async close(): Promise<void> {
    const servers = this.servers.splice(0);
    const closed = servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    await Promise.all([...[...this.connections].map((c) => c.close()), ...closed]);
  }

  /** Checks and runs one request; resolves to the reply to send. */
  async dispatch(connection: Connection, request: unknown): Promise<Reply> {
    if (!isObject(request)) {
      return { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } };
    }
    const req = request;
    const withId = (reply: Reply): Reply => ('id' in req ? { ...reply, id: req.id } : reply);
    const fail = (errorClass: QmpErrorClass, desc: string) =>
      withId({ error: { class: errorClass, desc } });

    // exec-oob: known once the client enabled the oob capability (QEMU's wording).
    const known = ['execute', 'arguments', 'id', ...(connection.oob ? ['exec-oob'] : [])];
    for (const key of Object.keys(req)) {
      if (!known.includes(key)) {
        return fail('GenericError', `QMP input member '${key}' is unexpected`);
      }
    }
    const oob = 'exec-oob' in req;
    if (oob && 'execute' in req) {
      return fail('GenericError', "QMP input member 'execute' clashes with 'exec-oob'");
    }
    const member = oob ? 'exec-oob' : 'execute';
    if (!(member in req)) return fail('GenericError', "QMP input lacks member 'execute'");
    const name = req[member];
    if (typeof name !== 'string')
      return fail('GenericError', `QMP input member '${member}' must be a string`);
    const args = req.arguments ?? {};
    if (!isObject(args)) {
      return fail('GenericError', "QMP input member 'arguments' must be an object");
    }
    if (!connection.negotiated && name !== 'qmp_capabilities') {
      return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    const command = this.commands.get(name);
    if (!command) return fail('CommandNotFound', `The command ${name} has not been found`);
    // As qemu-storage-daemon's: no command runs out of band (none is marked allow-oob).
    if (oob) return fail('GenericError', `The command ${name} does not support OOB`);

    try {
      const result = await command.run(args, connection);
      if (name === 'qmp_capabilities') connection.negotiated = true;
      this.log?.info(
        { event: 'qmp-command', session: connection.id, command: name },
        'QMP command',
      );
      return withId({ return: result ?? {} });
    } catch (e) {
      if (e instanceof QmpError) return fail(e.errorClass, e.message);
      // Bad arguments are the client's error, not the daemon's: answered, not logged.
      if (e instanceof BlockOptionError) return fail('GenericError', e.message);
      this.log?.warn(
        { event: 'qmp-command-failed', session: connection.id, command: name, err: e },
        'QMP command failed',
      );
      return fail('GenericError', (e as Error).message);
    }
  }
}
