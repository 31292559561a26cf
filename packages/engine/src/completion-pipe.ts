// The waiter of librbd's completions: a pipe that librbd writes to when one is done
// (rbd_set_image_notification with EVENT_TYPE_PIPE), read on the event loop by a
// net.Socket. It takes no thread, keeps the process alive only while I/O is in flight,
// and costs less per wake-up than a koffi poll handle on an eventfd: koffi builds an
// event object with three named properties for each call (about 4 µs a wake-up in the
// 4 KiB RBD write benchmark), and the fd would still have to be read by a call of ours.
// Here Node's own read drains the pipe, into one small buffer, then calls back.
import * as net from 'node:net';
import { IoError } from './errors.ts';
import { closeFd, O_CLOEXEC, O_NONBLOCK, pipe } from './native.ts';

export class CompletionPipe {
  /** The end to give librbd: each completion writes a few bytes to it. */
  readonly writeFd: number;
  private readonly socket: net.Socket;
  private referenced = false;
  private closed = false;

  constructor(onReadable: () => void) {
    // Both ends non-blocking: a full pipe (thousands of completions not yet collected)
    // is readable all the same, so a notification that does not fit loses nothing.
    const fds = pipe(O_NONBLOCK | O_CLOEXEC);
    if (typeof fds === 'number') throw new IoError(-fds, 'pipe2');
    this.writeFd = fds[1];
    this.socket = new net.Socket({
      fd: fds[0],
      readable: true,
      writable: false,
      onread: {
        buffer: Buffer.allocUnsafe(4096),
        callback: () => {
          onReadable();
          return true;
        },
      },
    });
    // Nothing comes from this pipe but what librbd writes: an error would be a bug of
    // ours, and the completions would stop; say so rather than lose it silently.
    this.socket.on('error', (err) => {
      if (!this.closed) process.emitWarning(`librbd completion pipe: ${err.message}`);
    });
    this.socket.unref();
  }

  /** Busy (I/O in flight): the process stays alive for the completions. */
  setBusy(busy: boolean): void {
    if (busy === this.referenced) return;
    this.referenced = busy;
    if (busy) this.socket.ref();
    else this.socket.unref();
  }

  /** Both ends closed (after the image: librbd writes until it is closed). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    closeFd(this.writeFd);
  }
}
