// Wire encodings the server and the client share, so that both sides agree on the bytes:
// the request header (the client writes it, the server reads it), option headers and
// option replies, and 64-bit integers. The numbers themselves are in protocol.ts.

import {
  EXTENDED_REQUEST_HEADER_BYTES,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
} from './protocol.ts';

const EMPTY = Buffer.alloc(0);

/** Writes a non-negative safe integer as a big-endian u64. */
export function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** Reads a big-endian u64 as a number (exact up to 2^53). */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}

/** A request header as the server reads it. */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  offset: number;
  /** The length (u32 compact, u64 extended). */
  length: number;
}

/** The request header's size: compact, or extended (64-bit length). */
export const requestHeaderBytes = (extended: boolean): number =>
  extended ? EXTENDED_REQUEST_HEADER_BYTES : REQUEST_HEADER_BYTES;

/** A request header; its cookie is `cookie` (a u32 in the low half of the u64). */
export function encodeRequestHeader(
  extended: boolean,
  flags: number,
  type: number,
  cookie: number,
  offset: number,
  length: number,
): Buffer {
  const h = Buffer.allocUnsafe(requestHeaderBytes(extended));
  h.writeUInt32BE(extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(0, 8);
  h.writeUInt32BE(cookie, 12);
  writeU64(h, 16, offset);
  if (extended) writeU64(h, 24, length);
  else h.writeUInt32BE(length, 24);
  return h;
}

/** The fields of a request header (the cookie and offset as sent are bytes 8..24). */
export function decodeRequestHeader(h: Buffer, extended: boolean): RequestHeader {
  return {
    magic: h.readUInt32BE(0),
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    offset: readU64(h, 16),
    length: extended ? readU64(h, 24) : h.readUInt32BE(24),
  };
}

/** An option of the handshake: IHAVEOPT, the option, its data. */
export function encodeOption(option: number, data: Uint8Array = EMPTY): Buffer {
  const buf = Buffer.allocUnsafe(16 + data.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(data.length, 12);
  buf.set(data, 16);
  return buf;
}

/** An option reply: its magic, the option answered, the reply type, its data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = EMPTY): Buffer {
  const buf = Buffer.allocUnsafe(20 + data.length);
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(type, 12);
  buf.writeUInt32BE(data.length, 16);
  buf.set(data, 20);
  return buf;
}
