// Asynchronous operations ("ao"), after Xen libxl's ao machinery (libxl_internal.h,
// "Machinery for asynchronous operations"; libxl_event.h, libxl_asyncop_how).
//
// Rules kept from libxl:
// - One initiating function serves every way of being told about completion (`AoHow`):
//   nothing (a Promise), `{ callback }` or `{ forEvent, queue }` (an OPERATION_COMPLETE
//   event). The how-object is copied: the caller may reuse or change it afterwards.
// - An ao completes exactly once, as the last thing that happens to it; a second
//   completion throws. It may complete while its initiating function still runs; the
//   caller is still never called back synchronously.
// - A failure during initiation (the initiator throws before completing the ao) is
//   reported as that failure and nothing else: no callback, no event.
// - The package's own bookkeeping (live registry, parent links, abort listeners, progress
//   iterators) is done before any user callback runs: callbacks go through the deferred
//   queue (defer.ts, libxl's egc).
// - Abort is advisory (libxl_ao_abort): the operation either completes with an
//   AoAbortError or finishes anyway. It flows down to nested aos and is a no-op once the
//   ao has completed.
//
// Beside this file: how the caller is told (ao-how.ts), progress (ao-progress.ts), the
// registry of live aos (ao-live.ts), and the caller's abort signals (caller-signal.ts).

import { type AoHow, copyHow } from './ao-how.ts';
import { live } from './ao-live.ts';
import { AoProgress, type ProgressReport } from './ao-progress.ts';
import { unwatchSignal, watchSignal } from './caller-signal.ts';
import { defer } from './defer.ts';
import { AoAbortError, AoError, AoErrorCode } from './errors.ts';

export interface AoOptions {
  /** The caller's abort signal; aborting it aborts the ao (advisory). */
  readonly signal?: AbortSignal;
  /** Makes this a nested ao of `parent`: the parent's abort reaches it, and the parent
   * cannot complete while it is live. */
  readonly parent?: Ao<unknown>;
  /** Progress reports by callback (coalesced: a slow consumer gets the latest). */
  readonly onProgress?: (report: ProgressReport) => void;
}

/** How an ao completed: `error` is null on success. */
export interface AoOutcome<T> {
  readonly error: Error | null;
  readonly result: T | undefined;
}

/** What the caller holds: abort, progress, identity. */
export interface AoHandle<T> {
  readonly id: number;
  readonly kind: string;
  /** True once the ao has completed (set before any callback runs). */
  readonly completed: boolean;
  /** True once the ao has been aborted (whether or not it honoured it). */
  readonly aborted: boolean;
  /** The latest progress report, if any. */
  readonly lastProgress: ProgressReport | undefined;
  /** How the ao completed (set with `completed`, before the caller is told). */
  readonly outcome: AoOutcome<T> | undefined;
  /** Requests an abort (advisory); a no-op once the ao has completed. */
  abort(reason?: unknown): void;
  /** Progress reports as an async iterator that ends when the ao completes. A slow
   * consumer sees the latest report at each step, never a backlog. */
  progress(): AsyncIterableIterator<ProgressReport>;
}

/** The promise returned when no how was given; `ao` is its handle. */
export type AoPromise<T> = Promise<T> & { readonly ao: AoHandle<T> };

/** The body of `runAo`: its return value (or the promise's value) is the result. */
export type AoBody<T> = (ao: Ao<T>) => T | PromiseLike<T>;

/** The initiator of `initiateAo`: arranges for `ao.complete()` to be called once. */
export type AoInitiator<T> = (ao: Ao<T>) => void;

// The function where a creation stack starts (its frame and those above are left out).
// biome-ignore lint/complexity/noBannedTypes: Error.captureStackTrace takes any function
type StackEntry = Function;

let nextId = 1;

type Notify<T> = (err: Error | null, result: T | undefined) => void;

/**
 * One asynchronous operation, as its implementation sees it. The caller sees the
 * `AoHandle` subset.
 */
export class Ao<T> implements AoHandle<T> {
  readonly id: number;
  readonly kind: string;
  readonly parent: Ao<unknown> | undefined;
  readonly createdAt: number;
  readonly #stackHolder: { stack?: string };
  readonly #controller = new AbortController();
  readonly #children = new Set<Ao<unknown>>();
  readonly #callerSignal: AbortSignal | undefined;
  readonly #progress: AoProgress;
  // Typed without T so that an Ao<T> is an Ao<unknown> (T is only in method parameters).
  #notify: Notify<unknown> | undefined;
  #completed = false;
  #outcome: AoOutcome<unknown> | undefined; // without T, as #notify
  #initiating = true;

  /** @internal use runAo / initiateAo; `entry` is where the creation stack starts. */
  constructor(kind: string, options: AoOptions, notify: Notify<T>, entry: StackEntry = Ao) {
    this.id = nextId++;
    this.kind = kind;
    this.parent = options.parent;
    this.createdAt = performance.now();
    this.#stackHolder = {};
    Error.captureStackTrace(this.#stackHolder, entry);
    this.#notify = notify as Notify<unknown>;
    this.#progress = new AoProgress(options.onProgress);
    this.#callerSignal = options.signal;
    live.add(this);
    if (this.parent) {
      this.parent.#children.add(this);
      if (this.parent.aborted) this.abort(this.parent.signal.reason);
    }
    if (this.#callerSignal) {
      if (this.#callerSignal.aborted) this.abort(this.#callerSignal.reason);
      else watchSignal(this.#callerSignal, this);
    }
  }

  /** Aborted when the ao is aborted; pass it to what the operation waits on. */
  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  get aborted(): boolean {
    return this.#controller.signal.aborted;
  }

  get completed(): boolean {
    return this.#completed;
  }

  /** The stack of the call that created this ao. */
  get stack(): string {
    return this.#stackHolder.stack ?? '';
  }

  /** The live nested aos of this ao. */
  get children(): readonly Ao<unknown>[] {
    return [...this.#children];
  }

  get lastProgress(): ProgressReport | undefined {
    return this.#progress.last;
  }

  get outcome(): AoOutcome<T> | undefined {
    return this.#outcome as AoOutcome<T> | undefined;
  }

  abort(reason?: unknown): void {
    if (this.#completed || this.aborted) return;
    this.#controller.abort(reason);
    const r = this.#controller.signal.reason;
    for (const child of [...this.#children]) child.abort(r);
  }

  /** The error to complete with when honouring an abort (reason kept). */
  abortError(): AoAbortError {
    return new AoAbortError(this.#controller.signal.reason);
  }

  /** Throws `abortError()` if the ao has been aborted. */
  throwIfAborted(): void {
    if (this.aborted) throw this.abortError();
  }

  /** Reports progress; the callback and iterators see the latest report. */
  reportProgress(done: number, total: number, message?: string): void {
    if (this.#completed) {
      throw new AoError(
        AoErrorCode.ALREADY_COMPLETE,
        `ao #${this.id} (${this.kind}) reported progress after it completed`,
      );
    }
    this.#progress.report(done, total, message);
  }

  progress(): AsyncIterableIterator<ProgressReport> {
    return this.#progress.iterator();
  }

  /**
   * Completes the ao, exactly once (libxl__ao_complete). Throws if it has already
   * completed, or if nested aos are still live. The bookkeeping is done at once; the
   * caller's callback, event or promise follows later, never on this stack.
   */
  complete(err: Error | null, result?: T): void {
    if (this.#completed) {
      throw new AoError(
        AoErrorCode.ALREADY_COMPLETE,
        `ao #${this.id} (${this.kind}) has already completed`,
      );
    }
    if (err !== null && !(err instanceof Error)) {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'complete() takes an Error or null');
    }
    if (this.#children.size > 0) {
      throw new AoError(
        AoErrorCode.CHILDREN_LIVE,
        `ao #${this.id} (${this.kind}) cannot complete: ${this.#children.size} nested ao(s) still live (${[
          ...this.#children,
        ]
          .map((c) => `#${c.id} ${c.kind}`)
          .join(', ')})`,
      );
    }
    const outcome = { error: err, result: err === null ? result : undefined };
    this.#outcome = outcome;
    this.#end();
    const notify = this.#notify!;
    this.#notify = undefined;
    defer(() => notify(outcome.error, outcome.result));
  }

  /** Starts a nested ao (promise mode). */
  child<U>(kind: string, body: AoBody<U>, options: Omit<AoOptions, 'parent'> = {}): AoPromise<U> {
    return runAo(kind, undefined, body, { ...options, parent: this as Ao<unknown> });
  }

  /** Whether the initiating function is still running (libxl: before AO_INPROGRESS). */
  get initiating(): boolean {
    return this.#initiating;
  }

  /** @internal */
  _initiated(): void {
    this.#initiating = false;
  }

  /** @internal: completes from a settled body, turning live children into an error. */
  _settle(err: Error | null, result?: T): void {
    if (this.#completed) return;
    if (this.#children.size > 0) {
      const children = [...this.#children];
      const childErr = new AoError(
        AoErrorCode.CHILDREN_LIVE,
        `ao #${this.id} (${this.kind}) ended while ${children.length} nested ao(s) were still live (${children
          .map((c) => `#${c.id} ${c.kind}`)
          .join(', ')}); they are aborted`,
        err ? { cause: err } : undefined,
      );
      for (const c of children) {
        c.abort(childErr);
        c.#detachFromParent();
      }
      this.complete(childErr);
      return;
    }
    this.complete(err, result);
  }

  /** @internal: initiation failed; forget the ao without any notification. */
  _createFail(): void {
    if (this.#completed) return;
    for (const c of [...this.#children]) c.#detachFromParent();
    this.#notify = undefined;
    this.#end();
  }

  #detachFromParent(): void {
    if (this.parent) this.parent.#children.delete(this);
  }

  #end(): void {
    this.#completed = true;
    live.delete(this);
    this.#detachFromParent();
    if (this.#callerSignal) unwatchSignal(this.#callerSignal, this);
    this.#progress.end();
  }
}

function toError(e: unknown): Error {
  if (e instanceof Error) return e;
  return new AoError(AoErrorCode.NON_ERROR_FAILURE, `operation failed with ${String(e)}`, {
    cause: e,
  });
}

function checkArgs(kind: unknown, fn: unknown, options: AoOptions): void {
  if (typeof kind !== 'string' || kind.length === 0) {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'ao kind must be a non-empty string');
  }
  if (typeof fn !== 'function') {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'ao body must be a function');
  }
  if (options === null || typeof options !== 'object') {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'ao options must be an object');
  }
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'options.signal must be an AbortSignal');
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'options.onProgress must be a function');
  }
  if (options.parent !== undefined) {
    if (!(options.parent instanceof Ao)) {
      throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'options.parent must be an Ao');
    }
    if (options.parent.completed) {
      throw new AoError(
        AoErrorCode.PARENT_COMPLETE,
        `parent ao #${options.parent.id} (${options.parent.kind}) has already completed`,
      );
    }
  }
}

function initiate<T>(
  kind: string,
  howIn: AoHow<T> | undefined,
  initiator: AoInitiator<T>,
  options: AoOptions,
  entry: StackEntry,
): AoPromise<T> | AoHandle<T> {
  checkArgs(kind, initiator, options);
  const how = copyHow(howIn);
  let promise: AoPromise<T> | undefined;
  let notify: Notify<T>;
  if (how === undefined) {
    let resolve!: (v: T) => void;
    let reject!: (e: Error) => void;
    const p = new Promise<T>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise = p as AoPromise<T>;
    notify = (err, result) => (err ? reject(err) : resolve(result as T));
  } else if ('callback' in how) {
    const callback = how.callback;
    notify = (err, result) => (err ? callback(err) : callback(null, result));
  } else {
    const { forEvent, queue } = how;
    notify = (err, result) =>
      queue.push({
        type: 'OPERATION_COMPLETE',
        forUser: forEvent,
        aoId: ao.id,
        kind,
        error: err,
        result: err ? undefined : result,
      });
  }
  const ao: Ao<T> = new Ao<T>(kind, options, notify, entry);
  if (promise) void Object.defineProperty(promise, 'ao', { value: ao, enumerable: false });
  try {
    initiator(ao);
  } catch (e) {
    const err = toError(e);
    if (!ao.completed) {
      // Initiation failed: report that failure alone (libxl AO_CREATE_FAIL).
      ao._createFail();
      if (promise) {
        // The promise is the caller's only channel: reject it (not on this stack).
        const p = Promise.reject(err) as AoPromise<T>;
        void Object.defineProperty(p, 'ao', { value: ao, enumerable: false });
        return p;
      }
      throw err;
    }
    // The ao completed, then its initiator threw: completion stands; the throw is a bug
    // of the initiator and surfaces as an uncaught exception, not on the caller's stack.
    queueMicrotask(() => {
      throw err;
    });
  }
  ao._initiated();
  return promise ?? ao;
}

/**
 * Starts an ao whose result is what `body` returns (or what its promise resolves to).
 * A synchronous throw from `body` is an initiation failure: thrown to the caller for
 * `{ callback }` / `{ forEvent }` (and nothing else happens), a rejected promise without
 * how. If `body` settles while nested aos are live, the ao completes with
 * ERR_VMDISK_AO_CHILDREN_LIVE and those aos are aborted.
 */
export function runAo<T>(
  kind: string,
  how: undefined,
  body: AoBody<T>,
  options?: AoOptions,
): AoPromise<T>;
export function runAo<T>(
  kind: string,
  how: AoHow<T>,
  body: AoBody<T>,
  options?: AoOptions,
): AoHandle<T>;
export function runAo<T>(
  kind: string,
  how: AoHow<T> | undefined,
  body: AoBody<T>,
  options?: AoOptions,
): AoPromise<T> | AoHandle<T>;
export function runAo<T>(
  kind: string,
  how: AoHow<T> | undefined,
  body: AoBody<T>,
  options: AoOptions = {},
): AoPromise<T> | AoHandle<T> {
  if (typeof body !== 'function') {
    throw new AoError(AoErrorCode.INVALID_ARGUMENT, 'ao body must be a function');
  }
  return initiate(
    kind,
    how,
    (ao) => {
      const r = body(ao);
      if (isThenable(r)) {
        r.then(
          (v) => ao._settle(null, v),
          (e: unknown) => ao._settle(toError(e)),
        );
      } else {
        ao._settle(null, r);
      }
    },
    options,
    runAo,
  );
}

/**
 * Starts an ao the libxl way: `initiator(ao)` arranges for `ao.complete(err, result)`
 * to be called exactly once (it may do so before it returns). A throw from the
 * initiator before completion is an initiation failure, as for `runAo`.
 */
export function initiateAo<T>(
  kind: string,
  how: undefined,
  initiator: AoInitiator<T>,
  options?: AoOptions,
): AoPromise<T>;
export function initiateAo<T>(
  kind: string,
  how: AoHow<T>,
  initiator: AoInitiator<T>,
  options?: AoOptions,
): AoHandle<T>;
export function initiateAo<T>(
  kind: string,
  how: AoHow<T> | undefined,
  initiator: AoInitiator<T>,
  options?: AoOptions,
): AoPromise<T> | AoHandle<T>;
export function initiateAo<T>(
  kind: string,
  how: AoHow<T> | undefined,
  initiator: AoInitiator<T>,
  options: AoOptions = {},
): AoPromise<T> | AoHandle<T> {
  return initiate(kind, how, initiator, options, initiateAo);
}

function isThenable<T>(v: unknown): v is PromiseLike<T> {
  return (
    (typeof v === 'object' || typeof v === 'function') &&
    v !== null &&
    typeof (v as { then?: unknown }).then === 'function'
  );
}
