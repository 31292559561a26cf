// The client's reply parser for the transmission phase: simple replies, structured reply
// chunks and extended reply chunks, fed with the socket's data as it arrives. READ data is
// copied straight into the caller's buffer; other payloads go through one fixed-size
// scratch buffer. Every length the server sends is checked against the request before a
// byte of its payload is taken: a violation throws (the client then disconnects).

import { protocolError } from './client-negotiation.ts';
import { NbdCommandError } from './errors.ts';
import type { Extent } from './export-target.ts';
import {
  ChunkType,
  Command,
  EXTENDED_REPLY_MAGIC,
  isChunkError,
  MAX_STRING_BYTES,
  META_CONTEXT_ALLOCATION_DEPTH,
  META_CONTEXT_BASE_ALLOCATION,
  META_CONTEXT_DIRTY_BITMAP,
  REPLY_FLAG_DONE,
  SIMPLE_REPLY_MAGIC,
  STATE_DIRTY,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
  WireError,
} from './protocol.ts';

/** An extent of block status as the client reports it: `flags` is the raw status value. */
export interface NbdExtent extends Extent {
  flags: number;
  /** qemu:dirty-bitmap:NAME contexts: the range is dirty (flag 1). */
  dirty?: boolean;
}

/** Block status per selected meta context name ('base:allocation', ...). */
export type BlockStatusResult = Map<string, NbdExtent[]>;

/** What the parser needs to know of a request in flight. */
export interface PendingRequest {
  command: number;
  commandName: string;
  offset: number;
  length: number;
  /** READ: where the data goes (length bytes). */
  buf?: Uint8Array;
  /** BLOCK_STATUS with REQ_ONE. */
  reqOne?: boolean;
  /** READ: bytes covered so far by data and hole chunks. */
  covered: number;
  error?: NbdCommandError;
  status?: Map<number, NbdExtent[]>;
  resolve(value: unknown): void;
  reject(err: Error): void;
}

/** The spec asks servers not to send more descriptors than this in one chunk. */
const MAX_EXTENTS_PER_CHUNK = 1 << 20;
const ERROR_HEAD = 6; // u32 errno, u16 message length
/** Room for the largest payload the parser buffers (an error chunk with its offset). */
const SCRATCH_BYTES = ERROR_HEAD + MAX_STRING_BYTES + 8;

const errnoNames = new Map<number, string>(Object.entries(WireError).map(([k, v]) => [v, k]));
export const errnoName = (errno: number): string => errnoNames.get(errno) ?? 'EINVAL';

// Plain objects rather than enums: the source also runs under Node's type stripping.
const State = {
  Magic: 0,
  Header: 1,
  /** Payload bytes collected into scratch (`need` of them), then handled. */
  Collect: 2,
  /** READ data copied into the request's buffer. */
  Data: 3,
  /** Block status descriptors, one at a time through scratch. */
  Extents: 4,
} as const;
type State = (typeof State)[keyof typeof State];

const Collecting = {
  DataOffset: 0,
  Hole: 1,
  Error: 2,
  Skip: 3,
  StatusHead: 4,
} as const;
type Collecting = (typeof Collecting)[keyof typeof Collecting];

export interface ReplyParserHooks {
  /** The request waiting for this cookie, or undefined. */
  lookup(cookie: bigint): PendingRequest | undefined;
  /** The reply to the request is complete (err: the server's error for it). */
  complete(cookie: bigint, req: PendingRequest, err: Error | undefined, value: unknown): void;
}

export class ReplyParser {
  private state: State = State.Magic;
  private readonly header = Buffer.alloc(32);
  private headerFill = 0;
  private headerSize = 4;
  private readonly scratch = Buffer.alloc(SCRATCH_BYTES);
  private fill = 0;
  private need = 0;
  private collecting: Collecting = Collecting.Error;

  // The chunk being parsed.
  private cookie = 0n;
  private req: PendingRequest | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private payloadLeft = 0;
  // Data chunks: where in req.buf the next byte goes.
  private dataPos = 0;
  // Status chunks.
  private extentSize = 8;
  private extentCount = 0;
  private extents: NbdExtent[] = [];
  private extentsTotal = 0;
  private contextName = '';

  private readonly structured: boolean;
  private readonly extended: boolean;
  private readonly contexts: ReadonlyMap<number, string>;
  private readonly hooks: ReplyParserHooks;

  constructor(
    structured: boolean,
    extended: boolean,
    contexts: ReadonlyMap<number, string>,
    hooks: ReplyParserHooks,
  ) {
    this.structured = structured;
    this.extended = extended;
    this.contexts = contexts;
    this.hooks = hooks;
  }

  /** Feeds received bytes; throws an NbdConnectionError on a protocol violation. */
  push(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      switch (this.state) {
        case State.Magic:
        case State.Header: {
          const take = Math.min(this.headerSize - this.headerFill, end - pos);
          chunk.copy(this.header, this.headerFill, pos, pos + take);
          this.headerFill += take;
          pos += take;
          if (this.headerFill === this.headerSize) this.onHeaderBytes();
          break;
        }
        case State.Collect: {
          const take = Math.min(this.need - this.fill, end - pos);
          chunk.copy(this.scratch, this.fill, pos, pos + take);
          this.fill += take;
          pos += take;
          if (this.fill === this.need) this.onCollected();
          break;
        }
        case State.Data: {
          const take = Math.min(this.payloadLeft, end - pos);
          this.req!.buf!.set(chunk.subarray(pos, pos + take), this.dataPos);
          this.dataPos += take;
          this.payloadLeft -= take;
          pos += take;
          if (this.payloadLeft === 0) this.endOfPayload();
          break;
        }
        case State.Extents: {
          const take = Math.min(this.extentSize - this.fill, end - pos);
          chunk.copy(this.scratch, this.fill, pos, pos + take);
          this.fill += take;
          pos += take;
          if (this.fill === this.extentSize) this.onExtent();
          break;
        }
      }
    }
  }

  /** Where the next bytes may land directly: the rest of the current READ payload. */
  directTarget(min: number): Uint8Array | undefined {
    if (this.state !== State.Data || this.payloadLeft < min) return undefined;
    return this.req!.buf!.subarray(this.dataPos, this.dataPos + this.payloadLeft);
  }

  /** `n` bytes of the current READ payload arrived in directTarget()'s buffer. */
  advanceDirect(n: number): void {
    this.dataPos += n;
    this.payloadLeft -= n;
    if (this.payloadLeft === 0) this.endOfPayload();
  }

  private reset(): void {
    this.state = State.Magic;
    this.headerFill = 0;
    this.headerSize = 4;
    this.req = undefined;
  }

  private onHeaderBytes(): void {
    if (this.state === State.Magic) {
      const magic = this.header.readUInt32BE(0);
      if (this.extended) {
        if (magic !== EXTENDED_REPLY_MAGIC) {
          throw protocolError(`reply magic 0x${magic.toString(16)} (extended headers are on)`);
        }
        this.headerSize = 32;
      } else if (magic === SIMPLE_REPLY_MAGIC) {
        this.headerSize = 16;
      } else if (magic === STRUCTURED_REPLY_MAGIC && this.structured) {
        this.headerSize = 20;
      } else {
        throw protocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
      this.state = State.Header;
      return;
    }
    const magic = this.header.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      this.onSimpleReply();
      return;
    }
    this.chunkFlags = this.header.readUInt16BE(4);
    this.chunkType = this.header.readUInt16BE(6);
    this.cookie = this.header.readBigUInt64BE(8);
    let length: number;
    if (this.extended) {
      const hi = this.header.readUInt32BE(24);
      if (hi !== 0) throw protocolError('a reply chunk payload of 4 GiB or more');
      length = this.header.readUInt32BE(28);
    } else {
      length = this.header.readUInt32BE(16);
    }
    const req = this.hooks.lookup(this.cookie);
    if (!req) throw protocolError(`a reply for unknown cookie ${this.cookie}`);
    this.req = req;
    this.payloadLeft = length;
    this.startChunk(req, length);
  }

  private onSimpleReply(): void {
    const errno = this.header.readUInt32BE(4);
    this.cookie = this.header.readBigUInt64BE(8);
    const req = this.hooks.lookup(this.cookie);
    if (!req) throw protocolError(`a reply for unknown cookie ${this.cookie}`);
    this.req = req;
    this.chunkFlags = REPLY_FLAG_DONE;
    if (errno !== 0) {
      req.error ??= new NbdCommandError(
        req.commandName,
        req.offset,
        req.length,
        errno,
        errnoName(errno),
      );
      this.finish();
      return;
    }
    if (req.command === Command.READ) {
      if (this.structured) throw protocolError('a simple reply with data to a READ');
      this.dataPos = 0;
      this.payloadLeft = req.length;
      req.covered = req.length;
      this.state = State.Data;
      return;
    }
    if (req.command === Command.BLOCK_STATUS) {
      throw protocolError('a simple success reply to BLOCK_STATUS');
    }
    this.finish();
  }

  private collect(n: number, what: Collecting): void {
    this.need = n;
    this.fill = 0;
    this.collecting = what;
    this.state = State.Collect;
  }

  private startChunk(req: PendingRequest, length: number): void {
    const type = this.chunkType;
    if (isChunkError(type)) {
      const extra = type === ChunkType.ERROR_OFFSET ? 8 : 0;
      if (length < ERROR_HEAD + extra) throw protocolError(`an error chunk of ${length} bytes`);
      if (type === ChunkType.ERROR || type === ChunkType.ERROR_OFFSET) {
        if (length > ERROR_HEAD + MAX_STRING_BYTES + extra) {
          throw protocolError(`an error chunk of ${length} bytes`);
        }
        this.collect(length, Collecting.Error);
      } else {
        // An unknown error type: its errno and message count, the rest is skipped.
        this.collect(Math.min(length, ERROR_HEAD + MAX_STRING_BYTES), Collecting.Error);
      }
      return;
    }
    switch (type) {
      case ChunkType.NONE:
        if (length !== 0) throw protocolError('a NONE chunk with a payload');
        if (!(this.chunkFlags & REPLY_FLAG_DONE)) throw protocolError('a NONE chunk without DONE');
        this.endOfPayload();
        return;
      case ChunkType.OFFSET_DATA:
        if (req.command !== Command.READ)
          throw protocolError(`a data chunk for ${req.commandName}`);
        if (length < 9 || length - 8 > req.length) {
          throw protocolError(`a data chunk of ${length} bytes for a read of ${req.length}`);
        }
        this.collect(8, Collecting.DataOffset);
        return;
      case ChunkType.OFFSET_HOLE:
        if (req.command !== Command.READ)
          throw protocolError(`a hole chunk for ${req.commandName}`);
        if (length !== 12) throw protocolError(`a hole chunk of ${length} bytes`);
        this.collect(12, Collecting.Hole);
        return;
      case ChunkType.BLOCK_STATUS:
      case ChunkType.BLOCK_STATUS_EXT: {
        if (req.command !== Command.BLOCK_STATUS) {
          throw protocolError(`a block status chunk for ${req.commandName}`);
        }
        const wide = type === ChunkType.BLOCK_STATUS_EXT;
        if (wide && !this.extended)
          throw protocolError('BLOCK_STATUS_EXT without extended headers');
        const head = wide ? 8 : 4;
        this.extentSize = wide ? 16 : 8;
        const count = (length - head) / this.extentSize;
        if (length < head + this.extentSize || !Number.isInteger(count)) {
          throw protocolError(`a block status chunk of ${length} bytes`);
        }
        if (count > MAX_EXTENTS_PER_CHUNK || (req.reqOne && count !== 1)) {
          throw protocolError(`a block status chunk with ${count} extents`);
        }
        this.extentCount = count;
        this.collect(head, Collecting.StatusHead);
        return;
      }
      default:
        throw protocolError(`unknown reply chunk type ${type}`);
    }
  }

  private onCollected(): void {
    const req = this.req!;
    const s = this.scratch;
    this.payloadLeft -= this.need;
    switch (this.collecting) {
      case Collecting.DataOffset: {
        const at = this.absoluteOffset(s.readBigUInt64BE(0));
        const n = this.payloadLeft;
        this.checkRange(req, at, n);
        this.dataPos = at - req.offset;
        req.covered += n;
        this.state = State.Data;
        return;
      }
      case Collecting.Hole: {
        const at = this.absoluteOffset(s.readBigUInt64BE(0));
        const n = s.readUInt32BE(8);
        if (n === 0) throw protocolError('a hole chunk of size 0');
        this.checkRange(req, at, n);
        req.buf!.fill(0, at - req.offset, at - req.offset + n);
        req.covered += n;
        this.endOfPayload();
        return;
      }
      case Collecting.Error: {
        const errno = s.readUInt32BE(0);
        const msgLen = s.readUInt16BE(4);
        const extra = this.chunkType === ChunkType.ERROR_OFFSET ? 8 : 0;
        const known =
          this.chunkType === ChunkType.ERROR || this.chunkType === ChunkType.ERROR_OFFSET;
        if (known ? ERROR_HEAD + msgLen + extra !== this.need : ERROR_HEAD + msgLen > this.need) {
          throw protocolError('an error chunk whose message length does not add up');
        }
        if (errno === 0) throw protocolError('an error chunk with error 0');
        const message = s.toString('utf8', ERROR_HEAD, ERROR_HEAD + msgLen);
        let errorOffset: number | undefined;
        if (extra) {
          errorOffset = this.absoluteOffset(s.readBigUInt64BE(ERROR_HEAD + msgLen));
          if (errorOffset < req.offset || errorOffset >= req.offset + req.length) {
            throw protocolError('an error offset outside the request');
          }
        }
        req.error ??= new NbdCommandError(
          req.commandName,
          req.offset,
          req.length,
          errno,
          errnoName(errno),
          message,
          errorOffset,
        );
        if (this.payloadLeft > 0) {
          // The rest of an unknown error chunk: skipped through the scratch buffer.
          this.collect(Math.min(this.payloadLeft, SCRATCH_BYTES), Collecting.Skip);
          return;
        }
        this.endOfPayload();
        return;
      }
      case Collecting.Skip:
        if (this.payloadLeft > 0)
          this.collect(Math.min(this.payloadLeft, SCRATCH_BYTES), Collecting.Skip);
        else this.endOfPayload();
        return;
      case Collecting.StatusHead: {
        const id = s.readUInt32BE(0);
        if (this.extentSize === 16) {
          // BLOCK_STATUS_EXT: a descriptor count, 0 or the true count.
          const declared = s.readUInt32BE(4);
          if (declared !== 0 && declared !== this.extentCount) {
            throw protocolError(
              `a block status chunk declaring ${declared} extents but holding ${this.extentCount}`,
            );
          }
        }
        const name = this.contexts.get(id);
        if (name === undefined) throw protocolError(`block status for unknown context id ${id}`);
        req.status ??= new Map();
        if (req.status.has(id)) throw protocolError(`two block status chunks for context ${name}`);
        this.contextName = name;
        this.extents = [];
        this.extentsTotal = 0;
        req.status.set(id, this.extents);
        this.fill = 0;
        this.state = State.Extents;
        return;
      }
    }
  }

  private onExtent(): void {
    const req = this.req!;
    const s = this.scratch;
    let length: number;
    let flags: number;
    if (this.extentSize === 16) {
      const big = s.readBigUInt64BE(0);
      if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError('an extent beyond 2^53');
      length = Number(big);
      flags = s.readUInt32BE(12);
    } else {
      length = s.readUInt32BE(0);
      flags = s.readUInt32BE(4);
    }
    if (length === 0) throw protocolError('an extent of length 0');
    if (this.extentsTotal >= req.length) {
      throw protocolError('block status extents past the end of the request');
    }
    if (req.reqOne && length > req.length) {
      throw protocolError('a REQ_ONE extent longer than the request');
    }
    this.extentsTotal += length;
    const e: NbdExtent = { length, hole: false, zero: false, flags };
    if (this.contextName === META_CONTEXT_BASE_ALLOCATION) {
      e.hole = (flags & STATE_HOLE) !== 0;
      e.zero = (flags & STATE_ZERO) !== 0;
    } else if (this.contextName === META_CONTEXT_ALLOCATION_DEPTH) {
      e.depth = flags;
    } else if (this.contextName.startsWith(META_CONTEXT_DIRTY_BITMAP)) {
      e.dirty = (flags & STATE_DIRTY) !== 0;
    }
    this.extents.push(e);
    this.payloadLeft -= this.extentSize;
    this.fill = 0;
    if (this.payloadLeft === 0) this.endOfPayload();
  }

  private absoluteOffset(v: bigint): number {
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError('a reply offset beyond 2^53');
    return Number(v);
  }

  private checkRange(req: PendingRequest, at: number, n: number): void {
    if (at < req.offset || at + n > req.offset + req.length) {
      throw protocolError(`a chunk for ${at}+${n} outside the read of ${req.offset}+${req.length}`);
    }
    if (req.covered + n > req.length) throw protocolError('read chunks overlap');
  }

  private endOfPayload(): void {
    if (this.chunkFlags & REPLY_FLAG_DONE) this.finish();
    else this.reset();
  }

  private finish(): void {
    const req = this.req!;
    const cookie = this.cookie;
    this.reset();
    if (req.error) {
      this.hooks.complete(cookie, req, req.error, undefined);
      return;
    }
    if (req.command === Command.READ) {
      if (req.covered !== req.length) {
        throw protocolError(`a read reply covering ${req.covered} of ${req.length} bytes`);
      }
      this.hooks.complete(cookie, req, undefined, req.buf);
      return;
    }
    if (req.command === Command.BLOCK_STATUS) {
      const result: BlockStatusResult = new Map();
      for (const [id, name] of this.contexts) {
        const got = req.status?.get(id);
        if (!got) throw protocolError(`no block status for context ${name}`);
        result.set(name, got);
      }
      this.hooks.complete(cookie, req, undefined, result);
      return;
    }
    this.hooks.complete(cookie, req, undefined, undefined);
  }
}
