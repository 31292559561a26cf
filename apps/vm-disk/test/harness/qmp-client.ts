// A minimal QMP client for tests: reads the greeting, sends requests, and reads the next
// reply or event (QEMU and vm-disk send one JSON text per line).
import { once } from 'node:events';
import net from 'node:net';

export type QmpMessage = Record<string, unknown>;

export class QmpTestClient {
  private buffer = '';
  private readonly messages: QmpMessage[] = [];
  private waiter: (() => void) | undefined;
  private closed = false;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.buffer += chunk;
      let nl = this.buffer.indexOf('\n');
      while (nl >= 0) {
        const line = this.buffer.slice(0, nl).trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (line) this.messages.push(JSON.parse(line) as QmpMessage);
        nl = this.buffer.indexOf('\n');
      }
      this.waiter?.();
    });
    const closed = () => {
      this.closed = true;
      this.waiter?.();
    };
    socket.on('end', closed);
    socket.on('close', closed);
  }

  /**
   * Connects to a QMP socket. `stayConnected`: the client never hangs up by itself, even
   * after the daemon closed its side (as a management tool that keeps its monitor open).
   */
  static async connect(
    path: string,
    options: { stayConnected?: boolean } = {},
  ): Promise<{ client: QmpTestClient; greeting: QmpMessage }> {
    // The socket file appears at bind(), a moment before listen(): until then a connect is
    // refused, so a refused connect is tried again (for a few seconds at most).
    const deadline = Date.now() + 5000;
    let socket: net.Socket;
    for (;;) {
      socket = net.connect({ path, allowHalfOpen: options.stayConnected ?? false });
      try {
        await new Promise<void>((resolve, reject) => {
          socket.once('connect', resolve);
          socket.once('error', reject);
        });
        break;
      } catch (err) {
        socket.destroy();
        if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || Date.now() > deadline) {
          throw err;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    const client = new QmpTestClient(socket);
    return { client, greeting: await client.next() };
  }

  /** The next message, reply or event, in arrival order. */
  async next(timeoutMs = 10_000): Promise<QmpMessage> {
    const deadline = Date.now() + timeoutMs;
    while (this.messages.length === 0) {
      if (this.closed) throw new Error('QMP connection closed');
      if (Date.now() > deadline) throw new Error('timed out waiting for a QMP message');
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
        setTimeout(resolve, 100);
      });
    }
    return this.messages.shift() as QmpMessage;
  }

  sendRaw(text: string): void {
    this.socket.write(text);
  }

  /** Writes bytes, waiting while the socket's buffer is full (streams large inputs). */
  async write(data: string | Buffer): Promise<void> {
    if (!this.socket.write(data)) await once(this.socket, 'drain');
  }

  /** Sends a request and returns the next non-event message (its reply). */
  async execute(request: QmpMessage | string): Promise<QmpMessage> {
    this.sendRaw(typeof request === 'string' ? request : `${JSON.stringify(request)}\n`);
    for (;;) {
      const message = await this.next();
      if (!('event' in message)) return message;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}
