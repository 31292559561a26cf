// The caller's abort signals of aos: aborting one aborts every ao started with it.

/** What a watched signal aborts. */
interface Abortable {
  abort(reason?: unknown): void;
}

// One 'abort' listener per caller signal, whatever the number of aos sharing it, so a
// long-lived signal never collects listeners (no MaxListenersExceededWarning).
const signalUsers = new WeakMap<AbortSignal, { aos: Set<Abortable>; listener: () => void }>();

export function watchSignal(signal: AbortSignal, ao: Abortable): void {
  let entry = signalUsers.get(signal);
  if (!entry) {
    const aos = new Set<Abortable>();
    const listener = (): void => {
      for (const a of [...aos]) a.abort(signal.reason);
    };
    entry = { aos, listener };
    signalUsers.set(signal, entry);
    signal.addEventListener('abort', listener);
  }
  entry.aos.add(ao);
}

export function unwatchSignal(signal: AbortSignal, ao: Abortable): void {
  const entry = signalUsers.get(signal);
  if (!entry) return;
  entry.aos.delete(ao);
  if (entry.aos.size === 0) {
    signal.removeEventListener('abort', entry.listener);
    signalUsers.delete(signal);
  }
}
