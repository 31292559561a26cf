// The server's replies in transmission, as bytes: simple replies, structured replies
// (chunks) and extended ones, in the mode the handshake chose. Encoding only: sending
// and the request's bookkeeping are the transmission's (server-transmission.ts).
//
// A request's `ids` are the 16 bytes of its header from the cookie on: the cookie (8),
// then the offset as sent (8), which an OFFSET_DATA chunk for the whole read repeats.

import type { Extent } from './export-target.ts';
import {
  ChunkType,
  EXTENDED_REPLY_MAGIC,
  MAX_STRING_BYTES,
  REPLY_FLAG_DONE,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.ts';
import { writeU64 } from './wire.ts';

/** The reply mode the handshake negotiated. */
export const ReplyMode = {
  SIMPLE: 0,
  /** NBD_OPT_STRUCTURED_REPLY. */
  STRUCTURED: 1,
  /** NBD_OPT_EXTENDED_HEADERS (structured replies with 64-bit lengths). */
  EXTENDED: 2,
} as const;
export type ReplyModeValue = (typeof ReplyMode)[keyof typeof ReplyMode];

/** Meta context ids the server hands out. */
export const CTX_BASE_ALLOCATION = 1;
export const CTX_ALLOCATION_DEPTH = 2;
/** The first export bitmap's context (qemu:dirty-bitmap:NAME); the next ones follow. */
export const CTX_DIRTY_BITMAP = 3;

/** One chunk: its type, its body, and data that follows the body (an OFFSET_DATA's). */
export type Chunk = readonly [type: number, body: Uint8Array, data?: Uint8Array];

/** What a streamed READ's header is for (see read-stream.ts StreamHost.header). */
export type StreamHeader =
  | { single: true }
  | { data: true; offset: number; length: number; done: boolean }
  | { hole: true; offset: number; length: number; done: boolean }
  | { errno: number; message: string };

const EMPTY = Buffer.alloc(0);

export class ReplyEncoder {
  readonly mode: ReplyModeValue;
  /** Bytes of a chunk header. */
  private readonly chunkBytes: number;

  constructor(mode: ReplyModeValue) {
    this.mode = mode;
    this.chunkBytes = mode === ReplyMode.EXTENDED ? 32 : 20;
  }

  /** Structured replies (or extended): chunks, holes, errors with messages. */
  get structured(): boolean {
    return this.mode !== ReplyMode.SIMPLE;
  }

  simpleHeader(buf: Buffer, ids: Buffer, errno: number): void {
    buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    buf.writeUInt32BE(errno, 4);
    ids.copy(buf, 8, 0, 8);
  }

  /** Writes a chunk header at the start of `buf`; returns its size. */
  chunkHeader(buf: Buffer, ids: Buffer, flags: number, type: number, length: number): number {
    if (this.mode === ReplyMode.EXTENDED) {
      buf.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
      buf.writeUInt16BE(flags, 4);
      buf.writeUInt16BE(type, 6);
      ids.copy(buf, 8, 0, 16);
      writeU64(buf, 24, length);
      return 32;
    }
    buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    buf.writeUInt16BE(flags, 4);
    buf.writeUInt16BE(type, 6);
    ids.copy(buf, 8, 0, 8);
    buf.writeUInt32BE(length, 16);
    return 20;
  }

  /** One structured reply: its chunks in order, the last flagged DONE. */
  chunks(ids: Buffer, chunks: readonly Chunk[]): Uint8Array[] {
    const out: Uint8Array[] = [];
    chunks.forEach(([type, body, data], i) => {
      const header = Buffer.allocUnsafe(this.chunkBytes + body.length);
      const flags = i === chunks.length - 1 ? REPLY_FLAG_DONE : 0;
      const at = this.chunkHeader(header, ids, flags, type, body.length + (data?.length ?? 0));
      header.set(body, at);
      out.push(header);
      if (data !== undefined) out.push(data);
    });
    return out;
  }

  /** Success without data (extended headers have no simple reply). */
  ok(ids: Buffer): Uint8Array[] {
    if (this.mode === ReplyMode.EXTENDED) return this.chunks(ids, [[ChunkType.NONE, EMPTY]]);
    const buf = Buffer.allocUnsafe(16);
    this.simpleHeader(buf, ids, 0);
    return [buf];
  }

  /** A READ of zero bytes: a simple reply, or a lone NONE chunk. */
  emptyRead(ids: Buffer): Uint8Array[] {
    return this.structured ? this.chunks(ids, [[ChunkType.NONE, EMPTY]]) : this.ok(ids);
  }

  error(ids: Buffer, errno: number, message: string): Uint8Array[] {
    if (this.mode === ReplyMode.SIMPLE) {
      const buf = Buffer.allocUnsafe(16);
      this.simpleHeader(buf, ids, errno);
      return [buf];
    }
    return this.chunks(ids, [[ChunkType.ERROR, errorBody(errno, message)]]);
  }

  /** Bytes before the data of a READ answered in one piece (simple header, or OFFSET_DATA). */
  get readHeaderBytes(): number {
    return this.mode === ReplyMode.SIMPLE ? 16 : this.chunkBytes + 8;
  }

  /** Writes the header of a READ answered in one piece of `length` bytes at buf's start. */
  readHeader(buf: Buffer, ids: Buffer, length: number): void {
    if (this.mode === ReplyMode.SIMPLE) {
      this.simpleHeader(buf, ids, 0);
      return;
    }
    const at = this.chunkHeader(buf, ids, REPLY_FLAG_DONE, ChunkType.OFFSET_DATA, 8 + length);
    ids.copy(buf, at, 8, 16);
  }

  /** An OFFSET_HOLE chunk's body. */
  holeChunk(offset: number, length: number): Chunk {
    const body = Buffer.allocUnsafe(12);
    writeU64(body, 0, offset);
    body.writeUInt32BE(length, 8);
    return [ChunkType.OFFSET_HOLE, body];
  }

  /** An OFFSET_DATA chunk: its offset, then `data`. */
  dataChunk(offset: number, data: Uint8Array): Chunk {
    const prefix = Buffer.allocUnsafe(8);
    writeU64(prefix, 0, offset);
    return [ChunkType.OFFSET_DATA, prefix, data];
  }

  /** The headers of a streamed READ's reply, `length` being the whole read's. */
  streamHeader(ids: Buffer, length: number, what: StreamHeader): Buffer {
    if ('single' in what) {
      const h = Buffer.allocUnsafe(this.readHeaderBytes);
      this.readHeader(h, ids, length);
      return h;
    }
    if ('errno' in what) {
      const body = errorBody(what.errno, what.message);
      const h = Buffer.allocUnsafe(this.chunkBytes + body.length);
      const at = this.chunkHeader(h, ids, REPLY_FLAG_DONE, ChunkType.ERROR, body.length);
      h.set(body, at);
      return h;
    }
    const flags = what.done ? REPLY_FLAG_DONE : 0;
    const hole = 'hole' in what;
    const h = Buffer.allocUnsafe(this.chunkBytes + (hole ? 12 : 8));
    const type = hole ? ChunkType.OFFSET_HOLE : ChunkType.OFFSET_DATA;
    const at = this.chunkHeader(h, ids, flags, type, hole ? 12 : 8 + what.length);
    writeU64(h, at, what.offset);
    if (hole) h.writeUInt32BE(what.length, at + 8);
    return h;
  }

  /** The chunks of a BLOCK_STATUS reply: one per meta context, in the order chosen. */
  blockStatus(contexts: readonly ContextStatus[]): Chunk[] {
    const extended = this.mode === ReplyMode.EXTENDED;
    return contexts.map(([id, descs]): Chunk => {
      const body = Buffer.alloc(extended ? 8 + 16 * descs.length : 4 + 8 * descs.length);
      body.writeUInt32BE(id, 0);
      if (extended) {
        body.writeUInt32BE(descs.length, 4);
        descs.forEach(([len, flags], i) => {
          writeU64(body, 8 + 16 * i, len);
          writeU64(body, 16 + 16 * i, flags);
        });
      } else {
        descs.forEach(([len, flags], i) => {
          body.writeUInt32BE(len, 4 + 8 * i);
          body.writeUInt32BE(flags >>> 0, 8 + 8 * i);
        });
      }
      return [extended ? ChunkType.BLOCK_STATUS_EXT : ChunkType.BLOCK_STATUS, body];
    });
  }
}

/** A context's block status descriptors: (length, flags) pairs in order. */
export type ContextStatus = readonly [id: number, descs: ReadonlyArray<readonly [number, number]>];

/**
 * Descriptors from (length, flags) pairs: neighbours with the same flags merged (QEMU's
 * nbd_extent_array_add), only the first with REQ_ONE.
 */
export function descriptors(
  extents: Iterable<readonly [number, number]>,
  reqOne: boolean,
): Array<[number, number]> {
  const descs: Array<[number, number]> = [];
  for (const [length, flags] of extents) {
    const last = descs[descs.length - 1];
    if (last !== undefined && last[1] === flags) last[0] += length;
    else if (reqOne && last !== undefined) break;
    else descs.push([length, flags]);
  }
  return descs;
}

/** An allocation extent's flags in a base:allocation or qemu:allocation-depth context. */
export function allocationFlags(id: number, e: Extent): number {
  if (id === CTX_BASE_ALLOCATION) return (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0);
  return e.depth ?? (e.hole ? 0 : 1);
}

/** An ERROR chunk's body: errno, the message's length, the message (cut to the limit). */
function errorBody(errno: number, message: string): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > MAX_STRING_BYTES) msg = msg.subarray(0, MAX_STRING_BYTES);
  const body = Buffer.allocUnsafe(6 + msg.length);
  body.writeUInt32BE(errno, 0);
  body.writeUInt16BE(msg.length, 4);
  msg.copy(body, 6);
  return body;
}
