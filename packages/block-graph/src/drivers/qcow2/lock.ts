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

/** Mutexes by key, created on demand and dropped when free. */
export class KeyedLocks {
  #locks = new Map<number, { holders: number; mutex: Mutex }>();

  async lock(key: number): Promise<void> {
    let l = this.#locks.get(key);
    if (!l) {
      l = { holders: 0, mutex: new Mutex() };
      this.#locks.set(key, l);
    }
    l.holders++;
    await l.mutex.lock();
  }

  unlock(key: number): void {
    const l = this.#locks.get(key);
    if (!l) return;
    l.mutex.unlock();
    if (--l.holders === 0) this.#locks.delete(key);
  }

  /** Takes the lock of `key` if it is free (synchronously); false when it is not. */
  tryLock(key: number): boolean {
    const l = this.#locks.get(key);
    if (l) return false;
    const m = new Mutex();
    m.tryLock();
    this.#locks.set(key, { holders: 1, mutex: m });
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
