// The aos that have not completed yet, for leak checks: every ao adds itself when it is
// created and removes itself when it completes.

import { AoError, AoErrorCode } from './errors.ts';

/** What the registry reads of an ao. */
export interface LiveAo {
  readonly id: number;
  readonly kind: string;
  readonly parent: LiveAo | undefined;
  readonly createdAt: number;
  readonly stack: string;
}

/** Information about a live ao (see `liveAos()`). */
export interface LiveAoInfo {
  readonly id: number;
  readonly kind: string;
  readonly parentId: number | undefined;
  /** Milliseconds since creation. */
  readonly ageMs: number;
  /** The stack of the call that created it. */
  readonly stack: string;
}

/** @internal: every ao not yet completed, in creation order. */
export const live = new Set<LiveAo>();
const leakReported = new WeakSet<LiveAo>();

/** The aos that have not completed yet, oldest first. */
export function liveAos(): LiveAoInfo[] {
  const now = performance.now();
  return [...live].map((ao) => ({
    id: ao.id,
    kind: ao.kind,
    parentId: ao.parent?.id,
    ageMs: now - ao.createdAt,
    stack: ao.stack,
  }));
}

/**
 * Throws ERR_VMDISK_AO_LEAKED, naming each ao's kind, age and creation stack, if any ao
 * created since the last check is still live. Each leaked ao is reported once, so one
 * leaking test does not fail the tests after it.
 */
export function assertNoLiveAos(): void {
  const leaked = [...live].filter((ao) => !leakReported.has(ao));
  if (leaked.length === 0) return;
  for (const ao of leaked) leakReported.add(ao);
  const now = performance.now();
  const lines = leaked.map(
    (ao) =>
      `  ao #${ao.id} ${ao.kind}${ao.parent ? ` (nested in #${ao.parent.id})` : ''}, ${Math.round(
        now - ao.createdAt,
      )} ms old, created at:\n${ao.stack.split('\n').slice(1).join('\n')}`,
  );
  throw new AoError(
    AoErrorCode.LEAKED,
    `${leaked.length} asynchronous operation(s) left live:\n${lines.join('\n')}`,
  );
}
