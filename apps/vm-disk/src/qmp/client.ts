// A QMP client for the CLI's commands that talk to a running daemon (`vm-disk graph`):
// connects to a monitor socket, negotiates capabilities, runs commands one at a time.
import net from 'node:net';
import { VmDiskError } from '../errors.ts';

type Message = Record<string, unknown>;

export class QmpClient {
  readonly #socket: net.Socket;
  readonly #messages: Message[] = [];
  #waiting: (() => void) | undefined;
  #failed: Error | undefined;

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    let buffer = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffer += chunk;
      for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (line) this.#messages.push(JSON.parse(line) as Message);
      }
      this.#waiting?.();
    });
    const fail = (e: Error) => {
      this.#failed ??= e;
      this.#waiting?.();
    };
    socket.on('error', fail);
    socket.on('close', () =>
      fail(new VmDiskError('ERR_VMDISK_APP_MONITOR', 'the QMP monitor closed the connection')),
    );
  }

  /** Connects to the monitor at `path` and negotiates capabilities. */
  static async connect(path: string): Promise<QmpClient> {
    const socket = net.connect({ path });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (e) =>
        reject(
          new VmDiskError(
            'ERR_VMDISK_APP_MONITOR',
            `cannot connect to the QMP monitor ${path}: ${e.message}`,
          ),
        ),
      );
    });
    const client = new QmpClient(socket);
    const greeting = await client.#next();
    if (!('QMP' in greeting))
      throw new VmDiskError('ERR_VMDISK_APP_MONITOR', `${path} is not a QMP monitor`);
    await client.execute('qmp_capabilities');
    return client;
  }

  /** Runs a command; resolves to its `return`, throws its error's description. */
  async execute(command: string, args?: Message): Promise<unknown> {
    this.#socket.write(
      `${JSON.stringify({ execute: command, ...(args && { arguments: args }) })}\n`,
    );
    for (;;) {
      const m = await this.#next();
      if ('event' in m) continue;
      if ('return' in m) return m.return;
      const error = m.error as { class?: string; desc?: string } | undefined;
      throw new VmDiskError(
        'ERR_VMDISK_APP_MONITOR',
        `${command}: ${error?.desc ?? JSON.stringify(m)}`,
      );
    }
  }

  close(): void {
    this.#socket.destroy();
  }

  async #next(): Promise<Message> {
    while (this.#messages.length === 0) {
      if (this.#failed) throw this.#failed;
      await new Promise<void>((resolve) => {
        this.#waiting = resolve;
      });
    }
    return this.#messages.shift()!;
  }
}
