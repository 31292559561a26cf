// One send queue per connection. A reply is a list of buffers handed over in one call, so
// replies never interleave; everything queued in one turn of the event loop leaves in
// one writev (the socket is corked on the first reply of a turn and uncorked once the
// turn's I/O callbacks have run).

import type { Writable } from 'node:stream';

export class SendQueue {
  private readonly socket: Writable;
  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(socket: Writable) {
    this.socket = socket;
  }

  /**
   * Queues one reply. `sent` runs once its bytes have been handed to the kernel, or the
   * socket is gone (its buffers may then be reused).
   */
  send(buffers: readonly Uint8Array[], sent?: () => void): void {
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) {
      if (sent) queueMicrotask(sent);
      return;
    }
    if (!this.corked) {
      this.corked = true;
      socket.cork();
      setImmediate(this.uncork);
    }
    const last = buffers.length - 1;
    for (let i = 0; i < last; i++) socket.write(buffers[i]!);
    if (sent) socket.write(buffers[last]!, () => sent());
    else socket.write(buffers[last]!);
  }
}
