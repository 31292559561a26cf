// One send queue per connection. A reply is a list of buffers handed over in one call, so
// replies never interleave; everything queued in one turn of the event loop leaves in
// one writev (the socket is corked on the first reply of a turn and uncorked once the
// turn's I/O callbacks have run). A reply streamed in pieces holds the queue: the other
// replies wait behind it, so that it stays contiguous on the wire.

import type { Writable } from 'node:stream';

type Reply = readonly [readonly Uint8Array[], (() => void) | undefined];

export class SendQueue {
  private readonly socket: Writable;
  private corked = false;
  private held = false;
  private readonly waiting: Reply[] = [];
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
    if (this.held) this.waiting.push([buffers, sent]);
    else this.write(buffers, sent);
  }

  /** Until release(), only sendHeld() goes out; send() waits. */
  hold(): void {
    this.held = true;
  }

  /** A part of the reply that holds the queue. */
  sendHeld(buffers: readonly Uint8Array[], sent?: () => void): void {
    this.write(buffers, sent);
  }

  /** The held reply is complete: what waited goes out, in order. */
  release(): void {
    this.held = false;
    for (const [buffers, sent] of this.waiting.splice(0)) this.write(buffers, sent);
  }

  private write(buffers: readonly Uint8Array[], sent: (() => void) | undefined): void {
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
