// A bounded write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks),
// after QEMU's qcow2-cache.c: entries are keyed by their host offset, pinned while a request
// uses them, evicted least recently used first. Dirty entries are written back by the owner
// (which knows the ordering rules): on eviction through `evictDirty`, otherwise on flush.

export interface CacheEntry {
  readonly offset: number;
  readonly data: Uint8Array;
  dirty: boolean;
  /** Requests using the entry; pinned entries are never evicted. */
  pins: number;
  /**
   * Write-backs in flight: such an entry is never evicted either, so that nobody reloads
   * it from disk before its latest content has landed there.
   */
  writing: number;
  lastUse: number;
}

export interface MetadataCacheOptions {
  /** Entries kept (at least 2). */
  capacity: number;
  entrySize: number;
  /** Fills `buf` with the table at `offset`; throws on a short read or invalid content. */
  load(offset: number, buf: Uint8Array): Promise<void>;
  /** Writes a dirty entry back (respecting ordering), leaving it clean. */
  evictDirty(entry: CacheEntry): Promise<void>;
  /** Memory for tables and write-back snapshots (the file's aligned allocator); zeroed. */
  alloc?(length: number): Uint8Array;
  /** Gives back what alloc returned, once nothing uses it. */
  release?(buf: Uint8Array): void;
}

export class MetadataCache {
  readonly #opts: MetadataCacheOptions;
  readonly #entries = new Map<number, CacheEntry>();
  readonly #loading = new Map<number, { waiters: number; promise: Promise<CacheEntry> }>();
  #clock = 0;
  #shrinking: Promise<void> | null = null;

  constructor(opts: MetadataCacheOptions) {
    this.#opts = { ...opts, capacity: Math.max(2, opts.capacity) };
  }

  #alloc(): Uint8Array {
    return this.#opts.alloc?.(this.#opts.entrySize) ?? new Uint8Array(this.#opts.entrySize);
  }

  #release(buf: Uint8Array): void {
    this.#opts.release?.(buf);
  }

  get capacity(): number {
    return this.#opts.capacity;
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The entry if cached (not pinned, not loaded). */
  peek(offset: number): CacheEntry | undefined {
    return this.#entries.get(offset);
  }

  /** The table at `offset` pinned (as get) when it is cached; undefined otherwise. */
  getCached(offset: number): CacheEntry | undefined {
    const e = this.#entries.get(offset);
    if (e) {
      e.pins++;
      e.lastUse = ++this.#clock;
    }
    return e;
  }

  /** The table at `offset`, loaded if needed, pinned: the caller must `unpin` it. */
  async get(offset: number): Promise<CacheEntry> {
    const e = this.getCached(offset);
    if (e) return e;
    let l = this.#loading.get(offset);
    if (!l) {
      l = { waiters: 0, promise: this.#load(offset) };
      this.#loading.set(offset, l);
    }
    // The entry enters the cache already pinned once per waiter: no eviction can slip in
    // between its insertion and the waiters resuming.
    l.waiters++;
    const loaded = await l.promise;
    await this.#shrink();
    return loaded;
  }

  async #load(offset: number): Promise<CacheEntry> {
    const data = this.#alloc();
    try {
      await this.#opts.load(offset, data);
    } catch (err) {
      this.#loading.delete(offset);
      this.#release(data);
      throw err;
    }
    const waiters = this.#loading.get(offset)?.waiters ?? 0;
    this.#loading.delete(offset);
    const existing = this.#entries.get(offset);
    if (existing) {
      this.#release(data);
      existing.pins += waiters;
      existing.lastUse = ++this.#clock;
      return existing;
    }
    const e: CacheEntry = {
      offset,
      data,
      dirty: false,
      pins: waiters,
      writing: 0,
      lastUse: ++this.#clock,
    };
    this.#entries.set(offset, e);
    return e;
  }

  /** A new zero-filled table at `offset` (not read from disk), dirty and pinned. */
  async create(offset: number, init?: Uint8Array): Promise<CacheEntry> {
    const data = this.#alloc();
    if (init) data.set(init);
    const e: CacheEntry = {
      offset,
      data,
      dirty: true,
      pins: 1,
      writing: 0,
      lastUse: ++this.#clock,
    };
    this.#entries.set(offset, e);
    await this.#shrink();
    return e;
  }

  /** Adds a clean table whose content is `data` (just written by the owner, from alloc). */
  insertClean(offset: number, data: Uint8Array): void {
    const e: CacheEntry = {
      offset,
      data,
      dirty: false,
      pins: 0,
      writing: 0,
      lastUse: ++this.#clock,
    };
    this.#entries.set(offset, e);
  }

  unpin(e: CacheEntry): void {
    e.pins--;
  }

  markDirty(e: CacheEntry): void {
    e.dirty = true;
  }

  /**
   * Takes a snapshot of a dirty entry for writing back: the entry becomes clean and stays in
   * the cache (not evictable) until `endWrite`, so that nobody reloads it from disk before
   * the snapshot has landed there. Synchronous: the snapshot is the content as of the call.
   */
  beginWrite(e: CacheEntry): Uint8Array {
    e.dirty = false;
    e.writing++;
    const copy = this.#alloc();
    copy.set(e.data);
    return copy;
  }

  /**
   * Ends a write-back begun with beginWrite (its snapshot `copy` is given back); a failed
   * one leaves the entry dirty again.
   */
  endWrite(e: CacheEntry, ok: boolean, copy: Uint8Array): void {
    e.writing--;
    if (!ok) e.dirty = true;
    this.#release(copy);
  }

  /** beginWrite, `write` the snapshot at the entry's offset, endWrite. */
  async writeBack(
    e: CacheEntry,
    write: (buf: Uint8Array, offset: number) => Promise<void>,
  ): Promise<void> {
    const copy = this.beginWrite(e);
    let ok = false;
    try {
      await write(copy, e.offset);
      ok = true;
    } finally {
      this.endWrite(e, ok, copy);
    }
  }

  /** Dirty entries, in offset order. */
  dirtyEntries(): CacheEntry[] {
    return [...this.#entries.values()].filter((e) => e.dirty).sort((a, b) => a.offset - b.offset);
  }

  /** Forgets a table (its cluster was freed); it must not be pinned by anyone else. */
  drop(offset: number): void {
    const e = this.#entries.get(offset);
    this.#entries.delete(offset);
    if (e) this.#release(e.data);
  }

  /** Forgets everything (on close). Precondition: no request in flight. */
  clear(): void {
    for (const e of this.#entries.values()) this.#release(e.data);
    this.#entries.clear();
  }

  async #shrink(): Promise<void> {
    while (this.#shrinking) await this.#shrinking;
    if (this.#entries.size <= this.#opts.capacity) return;
    this.#shrinking = (async () => {
      while (this.#entries.size > this.#opts.capacity) {
        let victim: CacheEntry | undefined;
        for (const e of this.#entries.values()) {
          if (e.pins > 0 || e.writing > 0) continue;
          if (!victim || e.lastUse < victim.lastUse) victim = e;
        }
        if (!victim) return; // all pinned: over capacity until requests finish
        if (victim.dirty) await this.#opts.evictDirty(victim);
        if (
          !victim.dirty &&
          victim.pins === 0 &&
          victim.writing === 0 &&
          this.#entries.get(victim.offset) === victim
        ) {
          this.#entries.delete(victim.offset);
          this.#release(victim.data);
        }
      }
    })();
    try {
      await this.#shrinking;
    } finally {
      this.#shrinking = null;
    }
  }
}
