// Serialisation of overlapping requests on one node (QEMU's tracked and serialising
// requests): ordinary writes wait for overlapping serialising operations; a serialising
// operation (read-modify-write, copy-on-read, a format's allocation) waits for every
// overlapping write and serialising operation that started before it.

export interface RangeHold {
  readonly start: number;
  readonly end: number;
  readonly serialising: boolean;
}

function overlaps(set: Set<RangeHold>, start: number, end: number, self?: RangeHold): boolean {
  // Most of the time nothing is held: no iterator.
  if (set.size === 0) return false;
  for (const r of set) if (r !== self && r.start < end && start < r.end) return true;
  return false;
}

export class RangeLock {
  private readonly writes = new Set<RangeHold>();
  private readonly serial = new Set<RangeHold>();
  private waiters: (() => void)[] = [];

  /** How many holds are in place (for tests and queries). */
  get size(): number {
    return this.writes.size + this.serial.size;
  }

  /**
   * Takes [start, end) for an ordinary write: waits while a serialising hold overlaps it
   * (other than `owner`, the serialising operation this write belongs to).
   */
  async write(start: number, end: number, owner?: RangeHold): Promise<RangeHold> {
    while (overlaps(this.serial, start, end, owner)) await this.wait();
    const hold: RangeHold = { start, end, serialising: false };
    this.writes.add(hold);
    return hold;
  }

  /** Takes [start, end) exclusively: waits while any hold overlaps it. */
  async serialise(start: number, end: number, owner?: RangeHold): Promise<RangeHold> {
    while (overlaps(this.serial, start, end, owner) || overlaps(this.writes, start, end, owner)) {
      await this.wait();
    }
    const hold: RangeHold = { start, end, serialising: true };
    this.serial.add(hold);
    return hold;
  }

  /** serialise() without waiting: the hold, or undefined when something overlaps. */
  trySerialise(start: number, end: number): RangeHold | undefined {
    if (overlaps(this.serial, start, end) || overlaps(this.writes, start, end)) return undefined;
    const hold: RangeHold = { start, end, serialising: true };
    this.serial.add(hold);
    return hold;
  }

  /** Gives a hold back and lets the waiters look again. */
  release(hold: RangeHold): void {
    if (hold.serialising) this.serial.delete(hold);
    else this.writes.delete(hold);
    const waiters = this.waiters;
    if (waiters.length === 0) return;
    this.waiters = [];
    for (const w of waiters) w();
  }

  private wait(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}
