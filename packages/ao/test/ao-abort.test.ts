// Exactly-once completion under races, advisory abort, abort trees, and abort listeners
// on long-lived signals.
import { getEventListeners } from 'node:events';
import { describe, expect, it } from 'vitest';
import {
  type Ao,
  AoAbortError,
  AoError,
  type AoHandle,
  initiateAo,
  liveAos,
  runAo,
} from '../src/index.ts';
import { deferred, turn, turns, until } from './helpers.ts';

/** A body that completes with its abort error when aborted, or with `value` when released. */
function abortable<T>(value: T, release?: Promise<void>) {
  return (ao: Ao<T>): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      if (ao.aborted) return reject(ao.abortError());
      ao.signal.addEventListener('abort', () => reject(ao.abortError()), { once: true });
      void release?.then(() => resolve(value));
    });
}

describe('exactly once', () => {
  it('a second complete() throws ALREADY_COMPLETE and changes nothing', async () => {
    const calls: unknown[][] = [];
    let theAo: Ao<number> | undefined;
    initiateAo<number>('once', { callback: (...a) => calls.push(a) }, (ao) => {
      theAo = ao;
      ao.complete(null, 1);
    });
    expect(() => theAo?.complete(null, 2)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_ALREADY_COMPLETE' }),
    );
    expect(() => theAo?.complete(new Error('late'))).toThrow(AoError);
    await turns(3);
    expect(calls).toEqual([[null, 1]]);
  });

  it('racing completions and aborts deliver one outcome per ao', async () => {
    const n = 60;
    const outcomes = new Map<number, unknown[][]>();
    const thrown: string[] = [];
    const handles: AoHandle<number>[] = [];
    for (let i = 0; i < n; i++) {
      const calls: unknown[][] = [];
      const handle = initiateAo<number>('race', { callback: (...a) => calls.push(a) }, (ao) => {
        const tryComplete = (err: Error | null, v?: number): void => {
          try {
            ao.complete(err, v);
          } catch (e) {
            thrown.push((e as AoError).code);
          }
        };
        // Three completers race: two results and the abort path.
        setImmediate(() => tryComplete(null, i));
        queueMicrotask(() => {
          if (i % 3 === 0) tryComplete(null, -i);
        });
        ao.signal.addEventListener('abort', () => tryComplete(ao.abortError()));
        if (i % 2 === 0) setImmediate(() => tryComplete(null, i + 1000));
      });
      if (i % 4 === 0) queueMicrotask(() => handle.abort('stop'));
      if (i % 5 === 0) setImmediate(() => handle.abort('late stop'));
      handles.push(handle);
      outcomes.set(handle.id, calls);
    }
    await turns(10);
    for (const calls of outcomes.values()) expect(calls).toHaveLength(1);
    expect(thrown.every((c) => c === 'ERR_VMDISK_AO_ALREADY_COMPLETE')).toBe(true);
    expect(thrown.length).toBeGreaterThan(0);
    for (const h of handles) expect(h.completed).toBe(true);
  });

  it('abort after completion is a no-op', async () => {
    const p = runAo('done', undefined, () => 5);
    expect(p.ao.completed).toBe(true);
    p.ao.abort('too late');
    expect(p.ao.aborted).toBe(false);
    await expect(p).resolves.toBe(5);
  });
});

describe('abort is advisory', () => {
  it("the caller's signal aborts; the ao completes with AbortError keeping the reason", async () => {
    const ac = new AbortController();
    const p = runAo('op', undefined, abortable(1), { signal: ac.signal });
    const reason = { why: 'user pressed stop' };
    ac.abort(reason);
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AoAbortError);
    expect(err).toMatchObject({ name: 'AbortError', code: 'ERR_VMDISK_AO_ABORTED', reason });
    expect((err as Error).cause).toBe(reason);
  });

  it('handle.abort() aborts; the default reason is the AbortSignal one', async () => {
    const calls: unknown[][] = [];
    const h = runAo<number>('op', { callback: (...a) => calls.push(a) }, abortable(1));
    h.abort();
    expect(h.aborted).toBe(true);
    await turns(3);
    expect(calls).toHaveLength(1);
    const err = calls[0]![0] as AoAbortError;
    expect(err.code).toBe('ERR_VMDISK_AO_ABORTED');
    expect((err.reason as Error).name).toBe('AbortError');
  });

  it('an operation may finish anyway, ignoring the abort', async () => {
    const release = deferred();
    const p = runAo('stubborn', undefined, async () => {
      await release.promise;
      return 'finished';
    });
    p.ao.abort('please stop');
    expect(p.ao.aborted).toBe(true);
    release.resolve();
    await expect(p).resolves.toBe('finished');
  });

  it('a signal already aborted is seen by the body at once', async () => {
    const ac = new AbortController();
    ac.abort('before start');
    let seen: boolean | undefined;
    const p = runAo('op', undefined, (ao) => {
      seen = ao.aborted;
      ao.throwIfAborted();
      return 1;
    });
    const q = runAo(
      'op',
      undefined,
      (ao) => {
        seen = ao.aborted;
        ao.throwIfAborted();
        return 1;
      },
      { signal: ac.signal },
    );
    await expect(p).resolves.toBe(1);
    await expect(q).rejects.toMatchObject({
      code: 'ERR_VMDISK_AO_ABORTED',
      reason: 'before start',
    });
    expect(seen).toBe(true);
  });

  it('one long-lived signal: one listener at most, none left, no MaxListeners warning', async () => {
    const ac = new AbortController();
    const warnings: Error[] = [];
    const onWarning = (w: Error): void => {
      warnings.push(w);
    };
    process.on('warning', onWarning);
    try {
      for (let i = 0; i < 100; i++) {
        await runAo('seq', undefined, async () => i, { signal: ac.signal });
      }
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
      const release = deferred();
      const many = Array.from({ length: 50 }, (_, i) =>
        runAo('concurrent', undefined, abortable(i, release.promise), { signal: ac.signal }),
      );
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(1);
      release.resolve();
      expect(await Promise.all(many)).toEqual(Array.from({ length: 50 }, (_, i) => i));
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
      // Still works after all that: a new ao on the same signal is aborted by it.
      const last = runAo('last', undefined, abortable(0), { signal: ac.signal });
      ac.abort('end');
      await expect(last).rejects.toMatchObject({ reason: 'end' });
      await turns(3);
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([]);
  });
});

describe('nested aos', () => {
  it('abort flows down the whole tree with the same reason', async () => {
    const reasons: unknown[] = [];
    const leafReady = deferred();
    let leaves = 0;
    const p = runAo('root', undefined, async (root) => {
      const mids = [0, 1].map((m) =>
        root.child(`mid${m}`, async (mid) => {
          const leafs = [0, 1].map((l) =>
            mid.child<number>(`leaf${m}${l}`, (leaf) => {
              if (++leaves === 4) leafReady.resolve();
              return abortable(0)(leaf).catch((e: AoAbortError) => {
                reasons.push(e.reason);
                throw e;
              });
            }),
          );
          const results = await Promise.allSettled(leafs);
          mid.throwIfAborted();
          return results;
        }),
      );
      await Promise.allSettled(mids);
      root.throwIfAborted();
      return 'not aborted';
    });
    await leafReady.promise;
    expect(liveAos().map((a) => a.kind)).toEqual(
      expect.arrayContaining(['root', 'mid0', 'mid1', 'leaf00', 'leaf01', 'leaf10', 'leaf11']),
    );
    p.ao.abort('shutdown');
    await expect(p).rejects.toMatchObject({ code: 'ERR_VMDISK_AO_ABORTED', reason: 'shutdown' });
    expect(reasons).toEqual(['shutdown', 'shutdown', 'shutdown', 'shutdown']);
  });

  it('a child started on an aborted parent starts aborted', async () => {
    const p = runAo('parent', undefined, async (ao) => {
      ao.abort('gone');
      const child = await ao.child('child', (c) => c.aborted).catch(() => 'x');
      return child;
    });
    await expect(p).resolves.toBe(true);
  });

  it('aborting a child does not abort its parent', async () => {
    const p = runAo('parent', undefined, async (ao) => {
      const c = ao.child('child', abortable(1));
      c.ao.abort('just the child');
      await c.catch(() => {});
      return ao.aborted;
    });
    await expect(p).resolves.toBe(false);
  });

  it('a parent cannot complete while a child is live', async () => {
    const release = deferred();
    let parentAo: Ao<string> | undefined;
    const calls: unknown[][] = [];
    initiateAo<string>('parent', { callback: (...a) => calls.push(a) }, (ao) => {
      parentAo = ao;
    });
    const child = runAo('child', undefined, abortable('c', release.promise), {
      parent: parentAo as Ao<unknown>,
    });
    expect(parentAo?.children.map((c) => c.kind)).toEqual(['child']);
    expect(() => parentAo?.complete(null, 'early')).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_CHILDREN_LIVE' }),
    );
    expect(parentAo?.completed).toBe(false);
    release.resolve();
    await expect(child).resolves.toBe('c');
    expect(parentAo?.children).toEqual([]);
    parentAo?.complete(null, 'after');
    await turns(3);
    expect(calls).toEqual([[null, 'after']]);
  });

  it('a body that returns with live children fails with CHILDREN_LIVE and aborts them', async () => {
    let child: Promise<number> | undefined;
    const p = runAo('careless', undefined, (ao) => {
      child = ao.child('forgotten', abortable(1));
      return 'returned too early';
    });
    const err = await p.catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_VMDISK_AO_CHILDREN_LIVE' });
    await expect(child).rejects.toMatchObject({
      code: 'ERR_VMDISK_AO_ABORTED',
      reason: err,
    });
  });

  it('a child of a completed parent is refused', async () => {
    const p = runAo('short', undefined, (ao) => ao);
    const ao = await p;
    expect(() => runAo('late-child', undefined, () => 1, { parent: ao as Ao<unknown> })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_PARENT_COMPLETE' }),
    );
    await turn();
  });
});

describe('libxl flows with abort in each mode', () => {
  it('an abort racing a synchronous completion is ignored', async () => {
    const calls: unknown[][] = [];
    const h = initiateAo<number>('sync', { callback: (...a) => calls.push(a) }, (ao) => {
      ao.complete(null, 1);
    });
    h.abort('race');
    await until(() => calls.length > 0, 'callback');
    expect(calls).toEqual([[null, 1]]);
  });
});
