// One memory budget for the request data of all the server's connections: READ data read
// and not yet handed to the kernel, WRITE payloads received and not yet written. Each
// connection holds an account. A connection admits a request only while it is under its
// share and the budget has room; otherwise it stops reading its socket until bytes come
// back (backpressure: nothing queues in memory).
//
// The share is the budget divided among the connections using it now (holding bytes or
// waiting for them), never below one piece: a connection alone may fill its whole window
// (16 x 1 MiB, as QEMU's NBD server allows 16 requests of any size), while 64 busy ones
// get 1/64 each. The total never exceeds the budget whatever the share: a connection
// over its share just admits nothing more until its own requests are done.
//
// Requests larger than STREAM_PIECE are streamed in pieces. A streamed WRITE is admitted
// for one piece, a streamed READ for the connection's stream slot (one piece, held while
// any streamed READ is pending: they run one at a time); that piece is kept until done
// and reused for each piece in turn, so a stream always progresses (a reply streaming
// holds the connection's send queue: replies behind it must not wait on the budget
// through it); a second piece in flight is taken only when there is room to spare. A
// client that never reads its replies thus pins at most two pieces of memory, whatever it
// asked for, and the others are served meanwhile.

/** Requests larger than this are streamed in pieces of this size (a multiple of any
 * power-of-two minimum block size up to 64 KiB). */
export const STREAM_PIECE = 1024 * 1024;

/** The default budget: 64 connections each with a full window of 16 x 256 KiB. */
export const DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024;

export class MemoryBudget {
  readonly limit: number;
  /** Bytes held by all accounts. */
  used = 0;
  /** Accounts holding bytes or waiting for them. */
  private active = 0;
  /** Accounts waiting for room, first come first served. */
  private readonly queue: BudgetAccount[] = [];
  private wakeQueued = false;
  /** The least share: one piece (or the whole budget if smaller). */
  private readonly floor: number;

  constructor(limit: number) {
    this.limit = limit;
    this.floor = Math.min(limit, STREAM_PIECE);
  }

  /** An account for one connection; `wake` runs when room may have come for it. */
  account(wake: () => void): BudgetAccount {
    return new BudgetAccount(this, wake);
  }

  /**
   * A connection's share now: the budget divided among the connections using it, at least
   * one piece.
   */
  share(): number {
    return Math.max(Math.floor(this.limit / Math.max(1, this.active)), this.floor);
  }

  /** @internal Room for `bytes` for this account now, first come first served. */
  fits(account: BudgetAccount, bytes: number): boolean {
    // Alone, anything goes: a request larger than the budget still progresses.
    if (this.used === 0) return true;
    if (this.used + bytes > this.limit) return false;
    return account.retrying || this.queue.length === 0 || this.queue[0] === account;
  }

  /** @internal Room to spare: what fits with nobody waiting. */
  spare(bytes: number): boolean {
    return this.used + bytes <= this.limit && this.queue.length === 0;
  }

  /** @internal Keeps the count of accounts in use up to date. */
  changed(wasActive: boolean, isActive: boolean): void {
    if (wasActive !== isActive) this.active += isActive ? 1 : -1;
  }

  /** @internal A waiter that is retrying keeps its place at the head. */
  enqueue(account: BudgetAccount): void {
    if (this.queue.includes(account)) return;
    if (account.retrying) this.queue.unshift(account);
    else this.queue.push(account);
  }

  /** @internal */
  dequeue(account: BudgetAccount): void {
    const i = this.queue.indexOf(account);
    if (i >= 0) this.queue.splice(i, 1);
  }

  /**
   * @internal Bytes came back: the first waiters retry, in order, while they get room.
   * In a microtask, so that nothing runs on the stack of whoever gave bytes back.
   */
  wake(): void {
    if (this.wakeQueued || this.queue.length === 0) return;
    this.wakeQueued = true;
    queueMicrotask(() => {
      this.wakeQueued = false;
      for (;;) {
        const head = this.queue[0];
        if (head === undefined) break;
        this.queue.shift();
        head.retry();
        // It waits again (at the head): no room for it, so none for those behind.
        if (this.queue[0] === head) break;
      }
    });
  }
}

/** One connection's part of the budget. */
export class BudgetAccount {
  /** Bytes this connection holds. */
  held = 0;
  /** In the budget's queue, waiting for room. */
  waiting = false;
  /** @internal Being woken: a refusal puts it back at the head of the queue. */
  retrying = false;
  private readonly budget: MemoryBudget;
  private readonly wake: () => void;

  constructor(budget: MemoryBudget, wake: () => void) {
    this.budget = budget;
    this.wake = wake;
  }

  private get active(): boolean {
    return this.held > 0 || this.waiting;
  }

  /**
   * Takes `bytes` for a new request if this connection is under its share (or holds
   * nothing) and the budget has room. False: the caller stops reading its socket, until
   * `wake` if the budget lacked room (first come first served), or until one of its own
   * requests is done if it is over its share.
   */
  admit(bytes: number): boolean {
    if (bytes === 0) return true;
    const b = this.budget;
    if (this.held > 0 && this.held + bytes > b.share()) return false;
    const was = this.active;
    if (!b.fits(this, bytes)) {
      this.waiting = true;
      b.enqueue(this);
      b.changed(was, true);
      return false;
    }
    this.waiting = false;
    b.dequeue(this);
    this.add(bytes, was);
    return true;
  }

  /** Takes `bytes` if this connection is under its share and there is room to spare; never waits. */
  tryTake(bytes: number): boolean {
    const b = this.budget;
    if (this.held + bytes > b.share() || !b.spare(bytes)) return false;
    this.add(bytes, this.active);
    return true;
  }

  /** Gives back bytes taken; waiters may then go on. */
  give(bytes: number): void {
    if (bytes === 0) return;
    const b = this.budget;
    const was = this.active;
    this.held -= bytes;
    b.used -= bytes;
    b.changed(was, this.active);
    b.wake();
  }

  /** The connection is gone: it waits no more (what it holds it gives back itself). */
  close(): void {
    const b = this.budget;
    const was = this.active;
    this.waiting = false;
    b.dequeue(this);
    b.changed(was, this.active);
    b.wake();
  }

  /** @internal Called by the budget (already out of its queue): try again. */
  retry(): void {
    const was = this.active;
    this.waiting = false;
    this.budget.changed(was, this.active);
    this.retrying = true;
    try {
      this.wake();
    } finally {
      this.retrying = false;
    }
  }

  private add(bytes: number, was: boolean): void {
    const b = this.budget;
    this.held += bytes;
    b.used += bytes;
    b.changed(was, this.active);
  }
}
