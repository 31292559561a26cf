// The callback queue, after libxl's egc ("event generation context"): whatever must
// reach user code (completion callbacks, OPERATION_COMPLETE events, promise settlement,
// progress reports, job status events) is queued while the package does its own
// bookkeeping and is run later, in order, once that bookkeeping is done. Nothing queued
// here ever runs on the stack of the call that queued it (no Zalgo).

type Task = () => void;

const queue: Task[] = [];
let scheduled = false;

function flush(): void {
  scheduled = false;
  // Tasks queued while flushing run in the same flush, after the ones already queued.
  for (let i = 0; i < queue.length; i++) {
    const task = queue[i]!;
    try {
      task();
    } catch (err) {
      // A throwing user callback must not stop the others: rethrow it on its own
      // (it becomes an uncaught exception, as for any callback API of Node).
      queueMicrotask(() => {
        throw err;
      });
    }
  }
  queue.length = 0;
}

/** Runs `task` after the current synchronous code and after every task queued before. */
export function defer(task: Task): void {
  queue.push(task);
  if (!scheduled) {
    scheduled = true;
    queueMicrotask(flush);
  }
}
