// qemu-io in interactive mode (commands on its stdin): a peer that holds one connection (or
// image) open between commands, as a guest's disk does.
import { type ChildProcess, spawn } from 'node:child_process';

export class QemuIoSession {
  private out = '';
  private readonly exited: Promise<number | null>;
  private done = false;
  private wake: (() => void) | undefined;

  private readonly child: ChildProcess;

  private constructor(child: ChildProcess) {
    this.child = child;
    for (const stream of [child.stdout!, child.stderr!]) {
      stream.setEncoding('utf8').on('data', (d: string) => {
        this.out += d;
        this.wake?.();
      });
    }
    // Writing to one that has exited is not an error of the test.
    child.stdin!.on('error', () => {});
    this.exited = new Promise((resolve) => {
      child.on('exit', (code) => {
        this.done = true;
        this.wake?.();
        resolve(code);
      });
    });
  }

  /** Starts `qemu-io ARGS` and waits for its first prompt (it has connected by then). */
  static async open(args: string[]): Promise<QemuIoSession> {
    const s = new QemuIoSession(spawn('qemu-io', args, { stdio: ['pipe', 'pipe', 'pipe'] }));
    await s.prompts(1);
    if (s.done) throw new Error(`qemu-io exited: ${s.out}`);
    return s;
  }

  /** Runs one command; resolves with what it printed once qemu-io prompts again. */
  async command(cmd: string): Promise<string> {
    const start = this.out.length;
    const want = this.count() + 1;
    this.child.stdin!.write(`${cmd}\n`);
    await this.prompts(want);
    return this.out.slice(start);
  }

  /** Tells it to quit (it closes its images, releasing their locks); resolves once it exited. */
  quit(): Promise<number | null> {
    if (!this.done) this.child.stdin!.end('quit\n');
    return this.exited;
  }

  /** Kills it; resolves once it exited. */
  kill(): Promise<number | null> {
    if (!this.done) this.child.kill('SIGKILL');
    return this.exited;
  }

  private count(): number {
    return this.out.split('qemu-io> ').length - 1;
  }

  private async prompts(n: number): Promise<void> {
    while (this.count() < n && !this.done) {
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }
}
