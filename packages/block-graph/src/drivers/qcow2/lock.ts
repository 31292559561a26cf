// Small asynchronous locks: a mutex and a keyed set of mutexes (one per guest cluster or
// per L2 table). Waiters are served in FIFO order; nothing here ever blocks the event loop.

export class Mutex {
  #locked = false;
  #waiters: Array<() => void> = [];

  get locked(): boolean {
    return this.#locked;
  }

  /** Takes the lock if it is free (synchronously); false when it is not. */
  tryLock(): boolean {
    if (this.#locked) return false;
    this.#locked = true;
    return true;
  }

  async lock(): Promise<void> {
    if (!this.#locked) {
      this.#locked = true;
      return;
    }
    await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  unlock(): void {
    const next = this.#waiters.shift();
    if (next) next();
    else this.#locked = false;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    await this.lock();
    try {
      return await fn();
    } finally {
      this.unlock();
    }
  }
}

/** A held key: its holder and waiters (FIFO; the array only once someone waits). */
interface KeyLock {
  /** The holder plus the waiters. */
  holders: number;
  waiters: Array<() => void> | null;
}

/**
 * Mutexes by key, created on demand and dropped when free. A free key costs one small
 * object while held (an allocating write locks every cluster it covers).
 */
export class KeyedLocks {
  #locks = new Map<number, KeyLock>();

  async lock(key: number): Promise<void> {
    const l = this.#locks.get(key);
    if (!l) {
      this.#locks.set(key, { holders: 1, waiters: null });
      return;
    }
    l.holders++;
    await new Promise<void>((resolve) => {
      if (l.waiters) l.waiters.push(resolve);
      else l.waiters = [resolve];
    });
  }

  unlock(key: number): void {
    const l = this.#locks.get(key);
    if (!l) return;
    if (--l.holders === 0) {
      this.#locks.delete(key);
      return;
    }
    // The next waiter holds it now.
    l.waiters!.shift()!();
  }

  /** Takes the lock of `key` if it is free (synchronously); false when it is not. */
  tryLock(key: number): boolean {
    if (this.#locks.has(key)) return false;
    this.#locks.set(key, { holders: 1, waiters: null });
    return true;
  }

  /**
   * Locks every key. Precondition: `keys` ascending (so that two callers never deadlock).
   * Free locks are taken without waiting.
   */
  async lockAll(keys: number[]): Promise<void> {
    for (const k of keys) if (!this.tryLock(k)) await this.lock(k);
  }

  unlockAll(keys: number[]): void {
    for (const k of keys) this.unlock(k);
  }
}
