// A connection's share of the request memory budget is the budget divided among the
// connections using it: one alone fills its whole window of 1 MiB requests (QEMU's NBD
// server lets a client have 16 requests of any size in flight), several divide it, and
// together they never hold more than the budget.
import { afterEach, describe, expect, it } from 'vitest';
import { type ExportTarget, NbdClient } from '../src/index.ts';
import { MemoryBudget, STREAM_PIECE } from '../src/memory-budget.ts';
import { type Started, startServer, until } from './server-helpers.ts';

const MiB = 1024 * 1024;

/** A target whose reads wait until released (each fills its buffer with its MiB index). */
class GatedTarget implements ExportTarget {
  readonly held: (() => void)[] = [];
  /** Budget bytes in use seen when each read arrived, at most. */
  peakInUse = 0;
  onRead: () => void = () => {};
  size(): number {
    return 64 * MiB;
  }
  /** Reads go straight through (a test's end). */
  open = false;
  read(offset: number, buf: Uint8Array): Promise<void> {
    this.onRead();
    if (this.open) {
      buf.fill((offset / MiB) & 0xff);
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      this.held.push(() => {
        buf.fill((offset / MiB) & 0xff);
        resolve();
      });
    });
  }
  release(): void {
    for (const r of this.held.splice(0)) r();
  }
}

let started: Started[] = [];
const clients: NbdClient[] = [];
const targets: GatedTarget[] = [];
afterEach(async () => {
  for (const t of targets.splice(0)) {
    t.open = true;
    t.release();
  }
  await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
  await Promise.all(started.map((s) => s.server.close()));
  started = [];
});

async function serve(target: GatedTarget, options = {}): Promise<Started> {
  targets.push(target);
  const s = await startServer([{ name: 'd', target, writable: false }], options);
  started.push(s);
  return s;
}

describe('the share of the memory budget', () => {
  it('a connection alone has all its 16 x 1 MiB reads in flight under the default budget', async () => {
    const target = new GatedTarget();
    const s = await serve(target);
    const client = await NbdClient.connect(s.uri('d'));
    clients.push(client);
    const reads = Array.from({ length: 16 }, (_, i) => client.read(i * MiB, MiB));
    await until('16 reads in the target', () => target.held.length === 16);
    expect(s.server.requestMemory.inUse).toBe(16 * MiB);
    target.release();
    const done = await Promise.all(reads);
    done.forEach((b, i) => {
      expect(b.every((x) => x === i)).toBe(true);
    });
    expect(s.server.requestMemory.inUse).toBe(0);
  });

  it('connections together never hold more than the budget, and all are served', async () => {
    const target = new GatedTarget();
    const s = await serve(target, { requestMemoryBudget: 8 * MiB });
    target.onRead = () => {
      target.peakInUse = Math.max(target.peakInUse, s.server.requestMemory.inUse);
    };
    const conns = await Promise.all(Array.from({ length: 4 }, () => NbdClient.connect(s.uri('d'))));
    clients.push(...conns);
    const reads = conns.flatMap((c) => Array.from({ length: 16 }, (_, i) => c.read(i * MiB, MiB)));
    // The budget full: 8 reads held, the rest wait for room.
    await until('the budget to be full', () => target.held.length === 8);
    expect(s.server.requestMemory.inUse).toBe(8 * MiB);
    // Released as they come until every read is done.
    let finished = false;
    const all = Promise.all(reads).finally(() => {
      finished = true;
    });
    await until('every read to be served', () => {
      target.release();
      return finished;
    });
    const done = await all;
    done.forEach((b, i) => {
      expect(b.every((x) => x === i % 16)).toBe(true);
    });
    expect(target.peakInUse).toBeLessThanOrEqual(8 * MiB);
    expect(s.server.requestMemory.inUse).toBe(0);
  });
});

describe('MemoryBudget.share', () => {
  it('the budget divided among the accounts using it, at least one piece', () => {
    const budget = new MemoryBudget(256 * MiB);
    expect(budget.share()).toBe(256 * MiB);
    const accounts = Array.from({ length: 300 }, () => budget.account(() => {}));
    accounts[0]!.admit(4096);
    expect(budget.share()).toBe(256 * MiB);
    accounts[1]!.admit(4096);
    expect(budget.share()).toBe(128 * MiB);
    for (const a of accounts.slice(2, 64)) a.admit(4096);
    expect(budget.share()).toBe(4 * MiB);
    for (const a of accounts.slice(64)) a.admit(4096);
    expect(budget.share()).toBe(STREAM_PIECE);
    for (const a of accounts) a.give(4096);
    expect(budget.used).toBe(0);
    expect(budget.share()).toBe(256 * MiB);
  });

  it('a connection over its share admits nothing more until its own requests are done', () => {
    const budget = new MemoryBudget(8 * MiB);
    const a = budget.account(() => {});
    const b = budget.account(() => {});
    for (let i = 0; i < 6; i++) expect(a.admit(MiB)).toBe(true);
    // b comes: the share is 4 MiB, a holds 6.
    expect(b.admit(MiB)).toBe(true);
    expect(a.admit(MiB)).toBe(false);
    expect(b.admit(MiB)).toBe(true);
    for (let i = 0; i < 3; i++) a.give(MiB);
    expect(a.admit(MiB)).toBe(true);
    expect(budget.used).toBe(6 * MiB);
  });
});
