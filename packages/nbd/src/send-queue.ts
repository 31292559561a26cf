// One send queue per connection. A reply is a list of buffers handed over in one call, so
// replies never interleave; everything queued in one turn of the event loop leaves in
// one writev (the socket is corked on the first reply of a turn and uncorked once the
// turn's I/O callbacks have run). A reply streamed in pieces holds the queue: the other
// replies wait behind it, so that it stays contiguous on the wire. A READ whose data are
// a file's cached bytes (ExportTarget.fileRange) may go out from the file itself, written
// to the socket's descriptor at once when nothing queued is waiting before it.

import type { Writable } from 'node:stream';

/**
 * What sends a file's bytes to a socket (vm-disk passes @vmdisk/engine's): each call
 * runs on this thread, never waits, and returns the bytes done or a negative errno.
 */
export interface FileSender {
  /** send(2) without waiting (MSG_DONTWAIT): the bytes the socket took. */
  send(sockFd: number, buf: Uint8Array): number;
  /** sendfile(2) to the non-blocking socket: the bytes the socket took. */
  sendFile(sockFd: number, fileFd: number, offset: number, length: number): number;
  /** pread(2): the bytes read (what the socket did not take is read and queued). */
  read(fd: number, buf: Uint8Array, offset: number): number;
}

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

  /** Where file bytes may be sent (plain sockets of a server given a FileSender). */
  private readonly files: { sockFd: number; sender: FileSender } | undefined;

  constructor(socket: Writable, files?: { sockFd: number; sender: FileSender }) {
    this.socket = socket;
    this.files = files;
  }

  /** Replies may take their data from files (sendFile). */
  get sendsFiles(): boolean {
    return this.files !== undefined;
  }

  /**
   * Sends `header`, then `length` bytes of file `fd` at `offset`, straight to the socket
   * if nothing is waiting before them (nothing held, nothing in the socket's buffer).
   * Returns how many of these bytes went out (all, some, or 0): the caller sends the rest
   * with send(), at once.
   */
  sendFile(header: Uint8Array, fd: number, offset: number, length: number): number {
    const f = this.files;
    const socket = this.socket;
    if (f === undefined || this.held || socket.destroyed) return 0;
    // What this turn queued goes first (the socket writes it now if it can).
    if (this.corked) this.uncork();
    if (socket.writableLength > 0) return 0;
    const h = f.sender.send(f.sockFd, header);
    if (h < header.byteLength) return Math.max(h, 0);
    let done = 0;
    while (done < length) {
      const n = f.sender.sendFile(f.sockFd, fd, offset + done, length - done);
      if (n <= 0) break;
      done += n;
    }
    return h + done;
  }

  /** pread through the FileSender (sendFile's caller reading what did not go out). */
  readFile(fd: number, buf: Uint8Array, offset: number): number {
    return this.files!.sender.read(fd, buf, offset);
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
