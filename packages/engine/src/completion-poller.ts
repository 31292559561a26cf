// The one waiter of the io_uring and aio backends: a poll handle on the event loop, on the
// fd their completions are signalled on (the ring fd, or an eventfd). It takes no libuv
// thread-pool thread, and it keeps the process alive only while I/O is in flight.
//
// An idle poller is unref'd, not stopped (a stop and start per request would cost two
// epoll_ctl calls at queue depth 1). At exit it must be stopped: when the environment tears
// down, libuv runs the handles once more, and a completion fd found readable then would have
// koffi call into JavaScript that can no longer run (a fatal napi_throw, SIGABRT; seen with
// the aio backend's eventfd in about one exit in six).
import koffi, { type node } from 'koffi';

/** The pollers not closed yet: stopped at the process's (or worker's) exit. */
const open = new Set<CompletionPoller>();

function stopAll(): void {
  for (const p of open) p.close();
}

export class CompletionPoller {
  private readonly handle: node.PollHandle;
  private referenced = false;

  constructor(fd: number, onReadable: () => void) {
    this.handle = koffi.node.poll(fd, { readable: true }, onReadable);
    this.handle.unref();
    if (open.size === 0) process.once('exit', stopAll);
    open.add(this);
  }

  /** Busy (I/O in flight): the process stays alive for the completions. */
  setBusy(busy: boolean): void {
    if (busy === this.referenced) return;
    this.referenced = busy;
    if (busy) this.handle.ref();
    else this.handle.unref();
  }

  close(): void {
    if (!open.delete(this)) return;
    this.handle.close();
    if (open.size === 0) process.removeListener('exit', stopAll);
  }
}
