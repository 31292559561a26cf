// Progress reports (callback and async iterator), the live registry, and the event queue.
import { describe, expect, it } from 'vitest';
import {
  assertNoLiveAos,
  EventQueue,
  initiateAo,
  type ProgressReport,
  runAo,
} from '../src/index.ts';
import { deferred, turns } from './helpers.ts';

describe('progress', () => {
  it('the callback gets the latest report, coalesced, and all before completion', async () => {
    const order: string[] = [];
    const reports: ProgressReport[] = [];
    runAo(
      'copy',
      { callback: () => order.push('complete') },
      async (ao) => {
        for (let i = 1; i <= 100; i++) ao.reportProgress(i, 100);
        await new Promise((r) => setImmediate(r));
        ao.reportProgress(100, 100, 'flushing');
        return 1;
      },
      {
        onProgress: (r) => {
          reports.push(r);
          order.push('progress');
        },
      },
    );
    await turns(5);
    expect(reports[0]).toEqual({ done: 100, total: 100 });
    expect(reports.at(-1)).toEqual({ done: 100, total: 100, message: 'flushing' });
    expect(reports.length).toBeLessThan(100);
    expect(order.at(-1)).toBe('complete');
  });

  it('the iterator yields reports and ends when the ao completes', async () => {
    const step = [deferred(), deferred(), deferred()];
    const p = runAo('work', undefined, async (ao) => {
      for (let i = 0; i < 3; i++) {
        await step[i]!.promise;
        ao.reportProgress(i + 1, 3, `step ${i + 1}`);
      }
      return 'done';
    });
    const seen: ProgressReport[] = [];
    const consumer = (async () => {
      for await (const r of p.ao.progress()) {
        seen.push(r);
        step[r.done]?.resolve();
      }
      return 'ended';
    })();
    step[0]!.resolve();
    await expect(consumer).resolves.toBe('ended');
    await expect(p).resolves.toBe('done');
    expect(seen.map((r) => r.message)).toEqual(['step 1', 'step 2', 'step 3']);
  });

  it('a slow consumer sees the latest report, not a backlog', async () => {
    const gate = deferred();
    const consumed = deferred();
    const p = runAo('burst', undefined, async (ao) => {
      ao.reportProgress(1, 1000);
      await gate.promise;
      for (let i = 2; i <= 1000; i++) ao.reportProgress(i, 1000);
      await consumed.promise;
      return 0;
    });
    const it = p.ao.progress();
    const first = await it.next();
    expect(first.value).toEqual({ done: 1, total: 1000 });
    gate.resolve();
    await turns(2);
    const second = await it.next();
    expect(second.value).toEqual({ done: 1000, total: 1000 });
    consumed.resolve();
    expect(await it.next()).toEqual({ value: undefined, done: true });
    await p;
  });

  it('an unseen last report is still yielded before the end; return() stops early', async () => {
    const p = runAo('quick', undefined, async (ao) => {
      ao.reportProgress(5, 5);
      return 1;
    });
    const it = p.ao.progress();
    await p;
    expect(await it.next()).toEqual({ value: { done: 5, total: 5 }, done: false });
    expect(await it.next()).toEqual({ value: undefined, done: true });

    const release = deferred();
    const q = runAo('long', undefined, async () => {
      await release.promise;
      return 2;
    });
    const it2 = q.ao.progress();
    const pending = it2.next();
    await it2.return?.();
    expect(await pending).toEqual({ value: undefined, done: true });
    release.resolve();
    await q;
  });

  it('rejects bad reports and reports after completion', async () => {
    let saved: { reportProgress(d: number, t: number): void } | undefined;
    const p = runAo('bad', undefined, (ao) => {
      saved = ao;
      expect(() => ao.reportProgress(-1, 10)).toThrow(
        expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
      );
      expect(() => ao.reportProgress(1, Number.NaN)).toThrow(
        expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
      );
      return 1;
    });
    await p;
    expect(() => saved?.reportProgress(1, 1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_ALREADY_COMPLETE' }),
    );
  });
});

describe('live registry', () => {
  it('lists live aos with kind, age and creation stack; assertNoLiveAos names them once', async () => {
    let complete: (() => void) | undefined;
    const h = initiateAo<void>('leaky-op', { callback: () => {} }, (ao) => {
      complete = () => ao.complete(null);
    });
    let err: unknown;
    try {
      assertNoLiveAos();
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'ERR_VMDISK_AO_LEAKED' });
    expect((err as Error).message).toContain('leaky-op');
    expect((err as Error).message).toContain('ao-progress.test.ts');
    expect((err as Error).message).toMatch(/\d+ ms old/);
    // Reported once: the next check (e.g. the next test's) does not fail for it again.
    expect(() => assertNoLiveAos()).not.toThrow();
    expect(h.completed).toBe(false);
    complete?.();
    await turns(2);
  });
});

describe('EventQueue', () => {
  it('check() is non-blocking, wait() takes the oldest or waits', async () => {
    const q = new EventQueue<number>();
    expect(q.check()).toBeUndefined();
    q.push(1);
    q.push(2);
    expect(q.size).toBe(2);
    expect(q.check()).toBe(1);
    expect(await q.wait()).toBe(2);
    const w1 = q.wait();
    const w2 = q.wait();
    q.push(3);
    q.push(4);
    expect(await w1).toBe(3);
    expect(await w2).toBe(4);
    expect(q.size).toBe(0);
  });

  it('wait() is abortable and an aborted wait takes no event', async () => {
    const q = new EventQueue<string>();
    const ac = new AbortController();
    const w = q.wait({ signal: ac.signal });
    ac.abort('stop waiting');
    await expect(w).rejects.toMatchObject({
      code: 'ERR_VMDISK_AO_WAIT_ABORTED',
      cause: 'stop waiting',
    });
    q.push('kept');
    expect(q.check()).toBe('kept');
    await expect(q.wait({ signal: ac.signal })).rejects.toMatchObject({
      code: 'ERR_VMDISK_AO_WAIT_ABORTED',
    });
  });
});
