// The numbers of the NBD protocol (docs/nbd.md; normative text: doc/proto.md of
// the NetworkBlockDevice/nbd project), shared by the server and the client. Integers on
// the wire are big-endian. Names follow the spec with the NBD_ prefix dropped.

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Handshake flags (server, u16). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** Client flags (u32). */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;
export type OptionCode = (typeof Option)[keyof typeof Option];

const REP_ERR = 0x80000000;
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: (REP_ERR | 1) >>> 0,
  ERR_POLICY: (REP_ERR | 2) >>> 0,
  ERR_INVALID: (REP_ERR | 3) >>> 0,
  ERR_PLATFORM: (REP_ERR | 4) >>> 0,
  ERR_TLS_REQD: (REP_ERR | 5) >>> 0,
  ERR_UNKNOWN: (REP_ERR | 6) >>> 0,
  ERR_SHUTDOWN: (REP_ERR | 7) >>> 0,
  ERR_BLOCK_SIZE_REQD: (REP_ERR | 8) >>> 0,
  ERR_TOO_BIG: (REP_ERR | 9) >>> 0,
  ERR_EXT_HEADER_REQD: (REP_ERR | 10) >>> 0,
} as const;
export const isOptionReplyError = (type: number): boolean => (type & REP_ERR) !== 0;

/** Information items of INFO and GO. */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (u16). */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;
export type CommandCode = (typeof Command)[keyof typeof Command];

/** Command flags (u16). */
export const CommandFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply flags (u16). */
export const REPLY_FLAG_DONE = 1 << 0;

export const ChunkType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) | 1,
  ERROR_OFFSET: (1 << 15) | 2,
} as const;
export const isChunkError = (type: number): boolean => (type & (1 << 15)) !== 0;

/** `base:allocation` extent flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
export const META_CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const META_CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';
/** `qemu:dirty-bitmap:NAME` (QEMU's docs/interop/nbd.txt): flag 1 set where dirty. */
export const META_CONTEXT_DIRTY_BITMAP = 'qemu:dirty-bitmap:';
export const STATE_DIRTY = 1 << 0;

/** Errors on the wire. */
export const WireError = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type WireErrorName = keyof typeof WireError;

/** Strings in options and info items: UTF-8, no NUL, at most this many bytes. */
export const MAX_STRING_BYTES = 4096;
/** READ and WRITE payloads up to this are legitimate (the spec's 32 MiB). */
export const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** Unfragmented (DF) reads up to this must be supported when DF is advertised. */
export const MAX_DF_READ_BYTES = 64 * 1024;

/** Request header sizes: compact (32-bit length) and extended (64-bit length). */
export const REQUEST_HEADER_BYTES = 28;
export const EXTENDED_REQUEST_HEADER_BYTES = 32;
