// The one waiter of the io_uring and aio backends: a poll handle on the event loop, on the
// fd their completions are signalled on (the ring fd, or an eventfd). It takes no libuv
// thread-pool thread, and it keeps the process alive only while I/O is in flight.
import koffi, { type node } from 'koffi';

export class CompletionPoller {
  private readonly handle: node.PollHandle;
  private referenced = false;

  constructor(fd: number, onReadable: () => void) {
    this.handle = koffi.node.poll(fd, { readable: true }, onReadable);
    this.handle.unref();
  }

  /** Busy (I/O in flight): the process stays alive for the completions. */
  setBusy(busy: boolean): void {
    if (busy === this.referenced) return;
    this.referenced = busy;
    if (busy) this.handle.ref();
    else this.handle.unref();
  }

  close(): void {
    this.handle.close();
  }
}
