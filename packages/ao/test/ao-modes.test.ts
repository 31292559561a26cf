// The three ways of being told about completion (AoHow), each with libxl's two flows:
// the ao completes before its initiating function returns, or after.
import { describe, expect, it } from 'vitest';
import {
  type Ao,
  AoError,
  type AoHandle,
  type AoHow,
  EventQueue,
  initiateAo,
  liveAos,
  type OperationCompleteEvent,
  runAo,
} from '../src/index.ts';
import { turns } from './helpers.ts';

type Flow = 'before-return' | 'after-return';

/** An initiator that completes with `outcome` in the given flow. */
function initiator<T>(flow: Flow, outcome: { err: Error | null; result?: T }) {
  return (ao: Ao<T>): void => {
    expect(ao.initiating).toBe(true);
    const done = (): void => {
      expect(ao.initiating).toBe(false);
      ao.complete(outcome.err, outcome.result);
    };
    if (flow === 'before-return') ao.complete(outcome.err, outcome.result);
    else setImmediate(done);
  };
}

const flows: Flow[] = ['before-return', 'after-return'];

describe.each(flows)('completion %s the initiator returns', (flow) => {
  it('promise mode resolves with the result, never before the call returns', async () => {
    const p = initiateAo<number>('test-op', undefined, initiator(flow, { err: null, result: 42 }));
    let settled = false;
    void p.then(() => {
      settled = true;
    });
    expect(p).toBeInstanceOf(Promise);
    expect(settled).toBe(false);
    expect(p.ao.completed).toBe(flow === 'before-return');
    await expect(p).resolves.toBe(42);
    expect(p.ao.completed).toBe(true);
  });

  it('promise mode rejects with the error', async () => {
    const err = new Error('boom');
    const p = initiateAo<number>('test-op', undefined, initiator(flow, { err }));
    await expect(p).rejects.toBe(err);
  });

  it('callback mode calls back once, asynchronously, and returns a handle', async () => {
    const calls: [Error | null, number | undefined][] = [];
    const handle = initiateAo<number>(
      'test-op',
      { callback: (err, result) => calls.push([err, result]) },
      initiator(flow, { err: null, result: 7 }),
    );
    expect(handle).not.toBeInstanceOf(Promise);
    expect(handle.kind).toBe('test-op');
    expect(calls).toEqual([]);
    await turns(5);
    expect(calls).toEqual([[null, 7]]);
  });

  it('callback mode passes the error and no result', async () => {
    const err = new Error('bad');
    const calls: unknown[][] = [];
    initiateAo<number>(
      'test-op',
      { callback: (...args) => calls.push(args) },
      initiator(flow, { err, result: 9 }),
    );
    expect(calls).toEqual([]);
    await turns(5);
    expect(calls).toEqual([[err]]);
  });

  it('event mode queues one OPERATION_COMPLETE with the cookie and result', async () => {
    const queue = new EventQueue<OperationCompleteEvent<string>>();
    const cookie = { mine: true };
    const handle = initiateAo<string>(
      'test-op',
      { forEvent: cookie, queue },
      initiator(flow, { err: null, result: 'ok' }),
    );
    expect(queue.check()).toBeUndefined();
    const ev = await queue.wait();
    expect(ev).toEqual({
      type: 'OPERATION_COMPLETE',
      forUser: cookie,
      aoId: handle.id,
      kind: 'test-op',
      error: null,
      result: 'ok',
    });
    expect(ev.forUser).toBe(cookie);
    await turns(3);
    expect(queue.check()).toBeUndefined();
  });

  it('event mode takes any sink with push', async () => {
    const got: OperationCompleteEvent<number>[] = [];
    initiateAo<number>(
      'test-op',
      { forEvent: 'k', queue: { push: (e) => got.push(e) } },
      initiator(flow, { err: null, result: 1 }),
    );
    expect(got).toEqual([]);
    await turns(5);
    expect(got.map((e) => [e.forUser, e.result])).toEqual([['k', 1]]);
  });

  it('event mode carries the error', async () => {
    const queue = new EventQueue<OperationCompleteEvent<string>>();
    const err = new Error('failed');
    initiateAo<string>('test-op', { forEvent: 5, queue }, initiator(flow, { err }));
    await turns(5);
    const ev = queue.check();
    expect(ev?.error).toBe(err);
    expect(ev?.result).toBeUndefined();
    expect(ev?.forUser).toBe(5);
  });

  it('runAo: a body returning a value or a promise completes the same way', async () => {
    const body = (): number | Promise<number> =>
      flow === 'before-return' ? 3 : new Promise((r) => setImmediate(() => r(3)));
    await expect(runAo('run-op', undefined, body)).resolves.toBe(3);
    const calls: unknown[][] = [];
    runAo('run-op', { callback: (...a) => calls.push(a) }, body);
    expect(calls).toEqual([]);
    const queue = new EventQueue<OperationCompleteEvent<number>>();
    runAo('run-op', { forEvent: 'c', queue }, body);
    expect(queue.check()).toBeUndefined();
    const ev = await queue.wait();
    expect(ev.result).toBe(3);
    await turns(5);
    expect(calls).toEqual([[null, 3]]);
  });
});

describe('the how-object', () => {
  it('is copied: changing or reusing it after the call changes nothing', async () => {
    const first: unknown[] = [];
    const second: unknown[] = [];
    const how: { callback: (e: Error | null, r?: number) => void } = {
      callback: (_e, r) => first.push(r),
    };
    initiateAo<number>('copy', how, (ao) => setImmediate(() => ao.complete(null, 1)));
    how.callback = (_e, r) => second.push(r);
    initiateAo<number>('copy', how, (ao) => setImmediate(() => ao.complete(null, 2)));
    await turns(10);
    expect(first).toEqual([1]);
    expect(second).toEqual([2]);

    const queue = new EventQueue<OperationCompleteEvent<number>>();
    const evHow = { forEvent: 'a', queue };
    initiateAo<number>('copy', evHow, (ao) => setImmediate(() => ao.complete(null, 1)));
    evHow.forEvent = 'b';
    const ev = await queue.wait();
    expect(ev.forUser).toBe('a');
  });

  it('is validated: a malformed how or argument is a clear error at once', () => {
    const bad: unknown[] = [
      null,
      42,
      {},
      { callback: 'no' },
      { forEvent: 1 },
      { forEvent: 1, queue: {} },
      { forEvent: 1, queue: null },
      { callback: () => {}, forEvent: 1 },
    ];
    for (const how of bad) {
      expect(() => runAo('x', how as AoHow<number>, () => 1)).toThrow(
        expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
      );
    }
    expect(() => runAo('', undefined, () => 1)).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
    expect(() => runAo('x', undefined, () => 1, { signal: {} as AbortSignal })).toThrow(
      expect.objectContaining({ code: 'ERR_VMDISK_AO_INVALID_ARGUMENT' }),
    );
    expect(() => runAo('x', undefined, 5 as unknown as () => number)).toThrow(AoError);
    expect(liveAos()).toEqual([]);
  });
});

describe('initiation failure', () => {
  it('is thrown to the caller in callback mode, with no callback ever', async () => {
    const err = new Error('cannot start');
    const calls: unknown[] = [];
    expect(() =>
      runAo('fail-init', { callback: (...a) => calls.push(a) }, () => {
        throw err;
      }),
    ).toThrow(err);
    expect(() =>
      initiateAo('fail-init', { callback: (...a) => calls.push(a) }, () => {
        throw err;
      }),
    ).toThrow(err);
    await turns(5);
    expect(calls).toEqual([]);
    expect(liveAos()).toEqual([]);
  });

  it('is thrown to the caller in event mode, with no event', async () => {
    const queue = new EventQueue<OperationCompleteEvent<void>>();
    const err = new Error('cannot start');
    expect(() =>
      runAo<void>('fail-init', { forEvent: 1, queue }, () => {
        throw err;
      }),
    ).toThrow(err);
    await turns(5);
    expect(queue.check()).toBeUndefined();
    expect(queue.size).toBe(0);
  });

  it('rejects the promise in promise mode (not thrown on the caller stack)', async () => {
    const err = new Error('cannot start');
    let p: Promise<void> | undefined;
    expect(() => {
      p = runAo<void>('fail-init', undefined, () => {
        throw err;
      });
    }).not.toThrow();
    await expect(p).rejects.toBe(err);
  });

  it('detaches nested aos started during a failed initiation (they live on alone)', async () => {
    let child: AoHandle<number> | undefined;
    const childCalls: unknown[][] = [];
    expect(() =>
      runAo('parent', { callback: () => {} }, (ao) => {
        child = runAo(
          'child',
          { callback: (...a) => childCalls.push(a) },
          (c) => new Promise<number>((r) => c.signal.addEventListener('abort', () => r(1))),
          { parent: ao },
        );
        throw new Error('init failed');
      }),
    ).toThrow('init failed');
    expect(liveAos().map((a) => [a.kind, a.parentId])).toEqual([['child', expect.any(Number)]]);
    child?.abort();
    await turns(3);
    expect(childCalls).toEqual([[null, 1]]);
  });
});

describe('bookkeeping comes before user callbacks', () => {
  it('the callback sees the ao completed and gone from the live registry', async () => {
    const seen: { completed: boolean; live: boolean }[] = [];
    const handle: AoHandle<number> = runAo(
      'bookkeeping',
      {
        callback: () =>
          seen.push({
            completed: handle.completed,
            live: liveAos().some((a) => a.id === handle.id),
          }),
      },
      () => 1,
    );
    expect(handle.completed).toBe(true);
    expect(handle.outcome).toEqual({ error: null, result: 1 });
    await turns(3);
    expect(seen).toEqual([{ completed: true, live: false }]);
  });
});
