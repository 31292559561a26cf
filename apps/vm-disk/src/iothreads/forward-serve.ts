// The main thread's side of the forward path: runs a request a worker forwarded through
// the export's BlockBackend, exactly as a connection served here would.
import type { BlockBackend } from '@vmdisk/block-graph';
import type { ForwardExtent, ForwardedError, ForwardOp } from './messages.ts';

export async function runForwarded(
  backend: BlockBackend,
  req: ForwardOp,
): Promise<ForwardExtent[] | undefined> {
  switch (req.op) {
    case 'read':
      await backend.read(req.offset, req.buf);
      return undefined;
    case 'write':
      await backend.write(req.offset, req.buf, { fua: req.fua });
      return undefined;
    case 'flush':
      await backend.flush();
      return undefined;
    case 'trim':
      await backend.trim(req.offset, req.length, { fua: req.fua });
      return undefined;
    case 'zero':
      await backend.writeZeroes(req.offset, req.length, {
        fua: req.fua,
        noHole: req.noHole,
        fastZero: req.fastZero,
      });
      return undefined;
    case 'status':
      return (await backend.blockStatus(req.offset, req.length)).map((e) => ({
        length: e.length,
        hole: e.hole,
        zero: e.zero,
        ...(e.depth !== undefined && { depth: e.depth }),
      }));
  }
}

/** An error as the worker's target rejects with it (its errno name kept). */
export function toForwardedError(err: unknown): ForwardedError {
  const e = err as { errnoName?: unknown; code?: unknown; message?: unknown };
  const errnoName =
    typeof e.errnoName === 'string'
      ? e.errnoName
      : typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code)
        ? e.code
        : undefined;
  return { errnoName, message: String(e.message ?? err) };
}
