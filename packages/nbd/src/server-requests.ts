// Requests of the transmission phase as the server takes them in: what a request header
// costs of the memory budget before it is admitted, whether a request may run at all
// (flags, bounds, alignment, permissions) and the NBD errno a target's failure maps to.

import type { ExportEntry } from './export-entry.ts';
import { STREAM_PIECE } from './memory-budget.ts';
import { Command, CommandFlag, WireError } from './protocol.ts';
import { ReplyMode, type ReplyModeValue } from './server-replies.ts';
import { readU64 } from './wire.ts';

export interface Request {
  readonly type: number;
  readonly flags: number;
  /** The cookie (8 bytes) then the offset as sent (8 bytes), for the reply headers. */
  readonly ids: Buffer;
  readonly offset: number;
  readonly length: number;
  /** Bytes of the memory budget it holds until done (one piece for a streamed WRITE). */
  readonly cost: number;
  /** A streamed READ: it runs on the connection's stream slot. */
  readonly streamed: boolean;
}

/** Why a request is refused: the NBD errno and a message. */
export type Refusal = [errno: number, message: string];

/**
 * The budget a request takes when admitted: the buffer it needs (a READ's data, a WRITE's
 * payload), or one piece for one streamed in pieces (a READ: the connection's stream
 * slot, unless it holds it already, `streamSlot`); and whether it is a streamed READ.
 */
export function costOf(
  h: Buffer,
  mode: ReplyModeValue,
  streamSlot: boolean,
): [cost: number, streamed: boolean] {
  const extended = mode === ReplyMode.EXTENDED;
  const flags = h.readUInt16BE(4);
  const type = h.readUInt16BE(6);
  const length = extended ? readU64(h, 24) : h.readUInt32BE(24);
  const data =
    type === Command.READ ||
    type === Command.WRITE ||
    (extended && (flags & CommandFlag.PAYLOAD_LEN) !== 0)
      ? length
      : 0;
  if (type === Command.READ && length > STREAM_PIECE) {
    return [streamSlot ? 0 : STREAM_PIECE, true];
  }
  return [Math.min(data, STREAM_PIECE), false];
}

/** Why a request is refused, or undefined if it may run. */
export function validate(
  req: Request,
  exp: ExportEntry,
  mode: ReplyModeValue,
  contexts: readonly number[],
): Refusal | undefined {
  const t = exp.target;
  const can = t.features;
  const { type, flags, offset, length } = req;
  let allowed = CommandFlag.FUA;
  switch (type) {
    case Command.READ:
      if (mode !== ReplyMode.SIMPLE) allowed |= CommandFlag.DF;
      break;
    case Command.WRITE:
      if (mode === ReplyMode.EXTENDED) allowed |= CommandFlag.PAYLOAD_LEN;
      break;
    case Command.WRITE_ZEROES:
      allowed |= CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO;
      break;
    case Command.BLOCK_STATUS:
      allowed |= CommandFlag.REQ_ONE;
      break;
    case Command.FLUSH:
    case Command.TRIM:
    case Command.CACHE:
      break;
    default:
      return [WireError.EINVAL, `unknown command ${type}`];
  }
  if ((flags & ~allowed) !== 0) {
    return [WireError.EINVAL, `flags 0x${flags.toString(16)} not valid for command ${type}`];
  }
  if (type === Command.FLUSH) return undefined;
  const writeLike =
    type === Command.WRITE || type === Command.TRIM || type === Command.WRITE_ZEROES;
  if (writeLike && !exp.writable) return [WireError.EPERM, 'the export is read-only'];
  if (type === Command.TRIM && !can.trim) return [WireError.EINVAL, 'trim is not supported'];
  if (type === Command.CACHE && !can.cache) return [WireError.EINVAL, 'cache is not supported'];
  if (type === Command.BLOCK_STATUS) {
    if (contexts.length === 0) return [WireError.EINVAL, 'no meta context selected'];
    if (length === 0) return [WireError.EINVAL, 'block status of zero bytes'];
  }
  const size = t.size();
  if (offset > size || length > size - offset) {
    const noSpace = type === Command.WRITE || type === Command.WRITE_ZEROES;
    return [noSpace ? WireError.ENOSPC : WireError.EINVAL, 'request beyond the end of the export'];
  }
  if ((type === Command.READ || type === Command.WRITE) && length > exp.blockSize.maximum) {
    return [WireError.EOVERFLOW, `length ${length} exceeds the maximum block size`];
  }
  const min = exp.blockSize.minimum;
  if (min > 1 && type !== Command.BLOCK_STATUS && (offset % min !== 0 || length % min !== 0)) {
    return [WireError.EINVAL, `request not aligned to ${min} bytes`];
  }
  return undefined;
}

/** The NBD errno for an error a target rejected with (EIO for anything unknown). */
export function wireErrno(err: unknown): number {
  const e = err as { errnoName?: unknown; code?: unknown } | null;
  const name =
    typeof e?.errnoName === 'string' ? e.errnoName : typeof e?.code === 'string' ? e.code : '';
  switch (name) {
    case 'EROFS':
    case 'EACCES':
      return WireError.EPERM;
    case 'EDQUOT':
    case 'EFBIG':
      return WireError.ENOSPC;
    case 'EOPNOTSUPP':
      return WireError.ENOTSUP;
    default:
      return (WireError as Record<string, number>)[name] ?? WireError.EIO;
  }
}

/** The errno and message a failure is answered with. */
export function describeFailure(err: unknown): Refusal {
  return [wireErrno(err), err instanceof Error ? err.message : String(err)];
}

/** Calls a target method; a synchronous throw becomes a rejection. */
export function attempt(fn: () => Promise<void>): Promise<void> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}
